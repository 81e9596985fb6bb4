"""The line between library and applications, checked on the source and on a real import.

* ``fedmerge/`` (the library) imports nothing from the applications (``server/``, ``clients/``,
  ``simulations/``, installed as ``fedmerge_server`` … ``fedmerge_simulations``), nor from the
  benchmarks (``bench/``, ``fedmerge_bench``), by either name, nor from the test support
  ``fedmerge_testing/`` (which the tests, fuzzers and benchmarks share);
* no application imports another (what two applications share lives in the library; the apps a
  simulation runs are loaded by import string), nor the benchmarks;
* the benchmarks sit above the applications, as the tests do: they measure the library and the
  applications (the simulations' experiments among them) and nothing imports them;
* the library has no import cycle, computed from the source: between modules (every import
  statement counts — inside functions and under ``TYPE_CHECKING`` too — and importing ``a.b.c`` runs
  the ``__init__`` of ``a`` and ``a.b``), and between its packages (``fedmerge.delta``,
  ``fedmerge.codec`` …), where each ``cli`` module belongs to the command layer above them all;
* nothing under ``fedmerge/flower/client/`` imports from ``fedmerge/flower/server/`` or any other
  server-side package (a folder rule on the source);
* a ClientApp process loads no server-side module (round engine, aggregators, store, intake service);
* neither app loads peft or transformers at start-up (only a LoRA round or a Hugging Face task does),
  and the intake's client library loads no torch;
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
               "simulations": "fedmerge_simulations"}  # fmt: skip
APP_NAMES = set(APP_FOLDERS) | set(APP_FOLDERS.values())
BENCH_NAMES = {"bench", "fedmerge_bench"}  # the measurement layer above the applications
TEST_SUPPORT = "fedmerge_testing"  # in the repository, not in the wheel: tests, fuzzers, benchmarks
SERVER_SIDE = ("fedmerge.flower.server", "fedmerge.aggregators", "fedmerge.store", "fedmerge.service")
# the service's own client side (the light gRPC client the bulk channel's uploads and downloads use)
CLIENT_SIDE_OF_SERVICE = ("fedmerge.service", "fedmerge.service.client")


def _relative_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a relative ``from`` import in ``module`` (at ``path``) names."""
    parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the modules of ``package`` (under ``root``) that loading it runs: each imported
    module, the ``__init__`` of every package above it, and ``from a import b`` of a submodule ``b``
    (the packages containing the importer itself are already loading and are left out)."""
    paths = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _relative_base(module, path, node) if node.level else node.module or ""
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in paths and not (module == name or module.startswith(name + ".")):
                    edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def package_graph(graph: dict[str, set[str]], depth: int = 2) -> dict[str, set[str]]:
    """The module graph folded onto packages (``fedmerge.delta.lora`` → ``fedmerge.delta``); each
    ``cli`` module is its own node (the command layer mounting the packages it composes)."""

    def home(module: str) -> str:
        return module if module.rsplit(".", 1)[-1] == "cli" else ".".join(module.split(".")[:depth])

    folded: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = folded.setdefault(home(module), set())
        edges.update(home(t) for t in targets if home(t) != home(module))
    return folded


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{m} → {', '.join(sorted(graph[m] & inside))}" for m in component)


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
        if name.split(".")[0] in APP_NAMES | BENCH_NAMES | {TEST_SUPPORT}
    }
    assert not offenders, f"the library imports applications, benchmarks or test support: {sorted(offenders)}"


def test_no_application_imports_another_or_the_benchmarks() -> None:
    offenders = set()
    for folder, installed in APP_FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in (APP_NAMES - {folder, installed}) | BENCH_NAMES:
                    offenders.add(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, f"applications import each other or the benchmarks: {sorted(offenders)}"


def test_the_benchmarks_import_only_downwards() -> None:
    """bench/ may use the library, the applications and the test support; nothing else is above it."""
    known = APP_NAMES | BENCH_NAMES | {TEST_SUPPORT, "fedmerge"}
    stray = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "bench").rglob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0].startswith(("fedmerge", "bench", "tests")) and name.split(".")[0] not in known
    }
    assert not stray, (
        f"the benchmarks import something that is neither library, app nor test support: {sorted(stray)}"
    )


def test_no_import_cycle_between_library_modules() -> None:
    graph = import_graph(ROOT, "fedmerge")
    found = cycles(graph)
    assert not found, "import cycles in the library: " + " | ".join(_describe(graph, c) for c in found)


def test_no_import_cycle_between_library_packages() -> None:
    graph = package_graph(import_graph(ROOT, "fedmerge"))
    found = cycles(graph)
    assert not found, "packages import each other: " + " | ".join(_describe(graph, c) for c in found)


def test_the_cycle_checker_sees_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "lib"
    for folder in (pkg, pkg / "a", pkg / "b"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (pkg / "a" / "low.py").write_text("from lib.b import high\n")
    (pkg / "a" / "other.py").write_text("")
    (pkg / "b" / "high.py").write_text("def f():\n    from ..a import other\n")
    (pkg / "b" / "cli.py").write_text("import lib.a.low\n")
    graph = import_graph(tmp_path, "lib")
    assert graph["lib.b.high"] == {"lib.a", "lib.a.other"} and graph["lib.a.low"] == {"lib.b", "lib.b.high"}
    assert cycles(graph) == []  # low → high → other: no module cycle
    assert cycles(package_graph(graph)) == [["lib.a", "lib.b"]]  # but a → b → a; b.cli is above both
    (pkg / "a" / "other.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lib.a.low\n"
    )
    assert cycles(import_graph(tmp_path, "lib")) == [["lib.a.low", "lib.a.other", "lib.b.high"]]


def test_the_checker_sees_an_application_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fedmerge_simulations.tasks import get_task\n    import bench.codec\n")
    assert {"fedmerge_simulations.tasks", "bench.codec"} <= imported_modules(bad)


def test_the_client_side_imports_nothing_of_the_server_side() -> None:
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "fedmerge" / "flower" / "client").rglob("*.py")
        for name in imported_modules(path)
        if name.startswith(SERVER_SIDE) and name not in CLIENT_SIDE_OF_SERVICE
    }
    assert not offenders, f"the client side imports the server side: {sorted(offenders)}"


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


def test_the_apps_start_without_peft_or_transformers() -> None:
    """Every Ray worker of a simulation imports the ClientApp; peft pulls in transformers (about 3 s
    on 2 cores), so both load only when a LoRA round or a Hugging Face task needs them."""
    code = (
        "import sys, fedmerge_clients.app, fedmerge_server.app\n"
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the apps import {out.strip()} at start-up"


def test_the_intake_client_starts_without_torch() -> None:
    """Submitting a file to the intake service needs grpc, not torch (1.3 s of start-up per process)."""
    code = "import sys, fedmerge.service.client\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "fedmerge.service.client imports torch at start-up"
