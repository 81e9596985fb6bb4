"""The line between library and applications, checked on the source and on a real import.

* ``fedmerge/`` (the library) imports nothing from the applications (``server/``, ``clients/``,
  ``simulations/``, ``bench/``, installed as ``fedmerge_server`` … ``fedmerge_bench``), by either name;
* a ClientApp process loads no server-side module (round engine, aggregators, store, intake service);
* every package folder is listed in ``[tool.setuptools] packages``, and nothing is installed under a
  generic top-level name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP_FOLDERS = {"server": "fedmerge_server", "clients": "fedmerge_clients",
               "simulations": "fedmerge_simulations", "bench": "fedmerge_bench"}  # fmt: skip
APP_NAMES = set(APP_FOLDERS) | set(APP_FOLDERS.values())
SERVER_SIDE = ("fedmerge.flower.rounds", "fedmerge.aggregators", "fedmerge.store", "fedmerge.service")
# the service's own client side (the light gRPC client the bulk channel's uploads and downloads use)
CLIENT_SIDE_OF_SERVICE = ("fedmerge.service", "fedmerge.service.client")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name an import statement in ``path`` names (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_library_imports_no_application() -> None:
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "fedmerge").rglob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0] in APP_NAMES
    }
    assert not offenders, f"the library imports applications: {sorted(offenders)}"


def test_the_checker_sees_an_application_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fedmerge_simulations.tasks import get_task\n    import bench.codec\n")
    assert {"fedmerge_simulations.tasks", "bench.codec"} <= imported_modules(bad)


def test_client_app_loads_no_server_side_module() -> None:
    code = (
        "import sys, fedmerge_clients.app, fedmerge.flower.client\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({SERVER_SIDE!r})\n"
        f"             and m not in {CLIENT_SIDE_OF_SERVICE!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "", f"a ClientApp imports server-side modules: {out.stdout.strip()}"


def test_every_package_folder_is_installed_under_the_project_name() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = {folder: name for name, folder in config["package-dir"].items()}
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] not in {"fedmerge", *mapping} or "_flower_bulk" in parts:
            continue
        found.add(".".join([mapping.get(parts[0], parts[0]), *parts[1:]]))
    assert found == listed, f"missing: {sorted(found - listed)}, stale: {sorted(listed - found)}"
    assert all(name.split(".")[0].startswith("fedmerge") for name in listed)
