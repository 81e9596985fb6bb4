"""Flower simulations on the supported runtime: ``flwr run`` against a SuperLink in simulation mode.

:func:`run_simulation_app` runs a ServerApp and a ClientApp on Flower's simulation runtime the way
Flower 1.42 supports it (``flwr.simulation.run_simulation`` is deprecated there and passes an empty
run config): it writes a Flower app directory whose ``pyproject.toml`` names the two components and
carries the run config, starts a private ``flower-superlink --simulation`` on free localhost ports
(its own ``FLWR_HOME``; Flower's managed local SuperLink uses fixed ports that concurrent runs would
share), submits the app with ``flwr run APP local --stream --federation-config …`` and stops the
SuperLink afterwards. The SuperLink starts ``flwr-simulation``, which loads the app, gives the
ServerApp ``context.run_config`` (the app's config) and runs the ClientApps on Ray.

The components are ``"module:attribute"`` references importable from the installed packages, a
:class:`ServerAppFactory`, or ``ServerApp`` / ``ClientApp`` objects (tests' scripted clients,
closures): objects are serialised by value with Ray's cloudpickle and loaded in the simulation process
and in Ray's workers by a small module written into the app directory. The ServerApp runs in another
process, so it reports back through :func:`emit_report`: each object it emits is pickled into a file
the caller's ``on_report`` receives as the run goes on (a :class:`ServerAppFactory` is called with
``on_round=emit_report``).

**Ray cluster**: ``ray_address`` attaches to an existing Ray cluster (``ray start --head`` …) instead
of starting a local one (the SuperLink's environment gets ``RAY_ADDRESS``, which ``ray.init`` reads);
each ClientApp then takes ``client_resources`` (``num_cpus``, ``num_gpus``) from whichever node Ray
places it on, as Flower configures them. The same works for ``flwr run`` by hand: start the SuperLink
with ``RAY_ADDRESS=HOST:PORT flower-superlink --simulation …``.

**Ray's inline threshold**: Ray hands a call argument larger than ``max_direct_call_object_size``
(100 KiB by default) to its shared-memory object store instead of inlining it in the call. A fedmerge
node's ``Context`` carries its cached base weights and its error-feedback residual (about twice the
model), so for small models every ClientApp call crossed that line: on the digits task (17 k
parameters, 2 CPU slots) a call took 34 ms instead of 13 ms. The SuperLink's environment sets
``RAY_max_direct_call_object_size`` to :data:`RAY_INLINE_BYTES` (Ray reads ``RAY_<setting>``); with
an existing cluster the setting is the cluster's (set it when running ``ray start``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.errors import ConfigError, FedMergeError

RAY_INLINE_BYTES = 8 << 20
REPORTS_ENV = "FEDMERGE_SIMULATION_REPORTS"
SERVERAPP_ENV = "FEDMERGE_SIMULATION_SERVERAPP"
CLIENTAPP_ENV = "FEDMERGE_SIMULATION_CLIENTAPP"
SERVER_FACTORY_ENV = "FEDMERGE_SIMULATION_SERVER_FACTORY"
_SHIM = "fedmerge_simulation_shim"
_SHIM_SOURCE = f'''"""Loads the ServerApp/ClientApp of this simulation (written by fedmerge)."""
import importlib
import os

from ray import cloudpickle


def _load(env):
    path = os.environ.get(env, "")
    if not path:
        return None
    with open(path, "rb") as f:
        return cloudpickle.load(f)


def _factory(env):
    spec = os.environ.get(env, "")
    if not spec:
        return None
    from fedmerge.flower.simulation import emit_report

    module, _, attr = spec.partition(":")
    factory = importlib.import_module(module)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(on_round=emit_report)


def _reporting_errors(app):
    """The ServerApp, with any exception it raises also handed back to the caller."""
    if app is None:
        return None
    from flwr.serverapp import ServerApp

    from fedmerge.flower.simulation import emit_server_error

    wrapper = ServerApp()

    @wrapper.main()
    def main(grid, context):
        try:
            app(grid=grid, context=context)
        except BaseException as exc:
            emit_server_error(exc)
            raise

    return wrapper


server_app = _reporting_errors(_load("{SERVERAPP_ENV}") or _factory("{SERVER_FACTORY_ENV}"))
client_app = _load("{CLIENTAPP_ENV}")
'''


class SimulationFailed(FedMergeError, RuntimeError):
    """A simulation run did not finish: the SuperLink did not start or ``flwr run`` failed."""


def backend_config(num_cpus: float = 1, num_gpus: float = 0.0) -> dict[str, Any]:
    """Per-client resources and the inline threshold, as a Flower ``backend_config`` dictionary."""
    return {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": {"_system_config": {"max_direct_call_object_size": RAY_INLINE_BYTES}},
    }


def emit_report(report: Any) -> None:
    """Inside a ServerApp run by :func:`run_simulation_app`: hand ``report`` to the caller's ``on_report``.

    Appends one length-prefixed pickle to the file named by :data:`REPORTS_ENV`; a no-op when it is
    unset (the ServerApp runs elsewhere)."""
    path = os.environ.get(REPORTS_ENV, "")
    if not path:
        return
    try:
        from ray import cloudpickle  # lambdas and closures in reports (default factories)

        data: bytes = cloudpickle.dumps(report)
    except ImportError:  # pragma: no cover - Ray is there wherever a simulation runs
        data = pickle.dumps(report)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, len(data).to_bytes(8, "little") + data)
    finally:
        os.close(fd)


_ERROR_MARK = "fedmerge-simulation-serverapp-error"


def emit_server_error(exc: BaseException) -> None:
    """Hand the exception that ends a ServerApp back to :func:`run_simulation_app`, which raises it."""
    try:
        emit_report((_ERROR_MARK, exc))
    except Exception:  # an exception that does not pickle: its type and message
        emit_report((_ERROR_MARK, SimulationFailed(f"{type(exc).__name__}: {exc}")))


class _ReportReader:
    """Reads the frames :func:`emit_report` appended to ``path`` since the last read."""

    def __init__(self, path: Path, on_report: Callable[[Any], None] | None) -> None:
        self.path, self.on_report, self.offset = path, on_report, 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            buf = f.read()
        pos = 0
        while len(buf) - pos >= 8:
            size = int.from_bytes(buf[pos : pos + 8], "little")
            if len(buf) - pos - 8 < size:
                break  # a frame still being written
            obj = pickle.loads(buf[pos + 8 : pos + 8 + size])
            pos += 8 + size
            if self.on_report is not None:
                self.on_report(obj)
        self.offset += pos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    raise ConfigError(f"run config {key!r}: {type(value).__name__} is not a bool, number or string")


def _app_pyproject(serverapp: str, clientapp: str, run_config: Mapping[str, Any]) -> str:
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedmerge-simulation"',
        'version = "1.0.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedmerge"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {json.dumps(serverapp)}",
        f"clientapp = {json.dumps(clientapp)}",
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{json.dumps(k)} = {_toml_value(k, v)}" for k, v in run_config.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServerAppFactory:
    """``"module:attribute"`` naming a function that returns the ServerApp given ``on_round=``: the
    ServerApp is built in the simulation process with ``on_round=emit_report``, so every round report
    it makes reaches the caller's ``on_report`` (fedmerge's is ``fedmerge_server.app:make_server_app``)."""

    spec: str


def _component(obj: Any, env_name: str, attr: str, work: Path, env: dict[str, str]) -> str:
    """A ``module:attr`` reference for ``obj`` (a reference already, or an app object pickled by value)."""
    if isinstance(obj, ServerAppFactory):
        if ":" not in obj.spec:
            raise ConfigError(f"ServerApp factory {obj.spec!r} must be 'module:attribute'")
        env[SERVER_FACTORY_ENV] = obj.spec
        return f"{_SHIM}:{attr}"
    if isinstance(obj, str):
        if ":" not in obj:
            raise ConfigError(f"app component {obj!r} must be 'module:attribute'")
        return obj
    from ray import cloudpickle

    _pickle_by_value(obj)
    path = work / f"{attr}.pkl"
    path.write_bytes(cloudpickle.dumps(obj))
    env[env_name] = str(path)
    return f"{_SHIM}:{attr}"


def _pickle_by_value(app: Any) -> None:
    """Register the modules that define an app's functions (and the functions they wrap or close
    over) for pickling by value when they are not installed packages (test modules, ``__main__``)."""
    import importlib.util

    from ray import cloudpickle

    for name in _defining_modules(vars(app), set()):
        top = name.split(".")[0]
        installed = top in {"fedmerge", "flwr"} or (
            top.startswith("fedmerge_") and importlib.util.find_spec(top) is not None
        )
        if not installed and name in sys.modules:
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(sys.modules[name])


def _defining_modules(obj: Any, seen: set[int], depth: int = 0) -> set[str]:
    if depth > 4 or id(obj) in seen:
        return set()
    seen.add(id(obj))
    found: set[str] = set()
    children: list[Any] = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple):
        children = list(obj)
    elif callable(obj) and hasattr(obj, "__code__"):
        if getattr(obj, "__module__", None):
            found.add(obj.__module__)
        children = [c.cell_contents for c in (obj.__closure__ or ()) if _filled(c)]
        children += [getattr(obj, "__wrapped__", None)]
    for child in children:
        if child is not None:
            found |= _defining_modules(child, seen, depth + 1)
    return found


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _die_with_parent() -> None:
    """In the SuperLink's process before exec: SIGTERM when the caller dies (even by SIGKILL), so a
    killed caller leaves no SuperLink behind (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


def superlink_env(
    home: Path, reports: Path, env: Mapping[str, str] | None = None, ray_address: str | None = None
) -> dict[str, str]:
    """The private SuperLink's environment: this process's, with Flower's home, telemetry and
    dependency installation off, the reports file, ``env`` on top; this interpreter's ``bin``
    directory first on ``PATH`` (the SuperLink starts ``flower-superexec`` and ``flwr-simulation`` by
    name: those of this installation, also when its environment is not activated); ``RAY_ADDRESS``
    for an existing cluster, else none and Ray's inline threshold raised (module docstring)."""
    run_env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DEDUP_LOGS": "0",
        REPORTS_ENV: str(reports),
        **(env or {}),
    }
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", "")]).rstrip(
        os.pathsep
    )
    if ray_address:
        run_env["RAY_ADDRESS"] = ray_address
    else:
        run_env.pop("RAY_ADDRESS", None)
        run_env.setdefault("RAY_max_direct_call_object_size", str(RAY_INLINE_BYTES))
    return run_env


def _stop(proc: subprocess.Popen[Any]) -> None:
    """End ``proc`` and its process group (it was started in a session of its own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes left in the group


def _wait_for_port(port: int, proc: subprocess.Popen[Any], log: Path) -> None:
    """Until the SuperLink accepts connections; fails as soon as it exits (no wall-clock guess)."""
    while True:
        if proc.poll() is not None:
            raise SimulationFailed(
                f"flower-superlink exited with code {proc.returncode} before listening:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)


def run_simulation_app(
    server_app: Any,
    client_app: Any,
    *,
    num_supernodes: int,
    run_config: Mapping[str, Any] | None = None,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    on_report: Callable[[Any], None] | None = None,
    env: Mapping[str, str] | None = None,
    output: Callable[[str], None] | None = None,
) -> None:
    """Run ``server_app`` and ``num_supernodes`` virtual ``client_app`` nodes on Flower's simulation runtime.

    ``run_config`` becomes the app's ``[tool.flwr.app.config]`` (the ServerApp's and every
    ClientApp's ``context.run_config``). ``num_cpus`` / ``num_gpus``: each ClientApp's Ray resources.
    ``ray_address``: attach to that Ray cluster instead of starting a local one; ``ray_num_cpus``: the
    CPUs of the local Ray instance (Flower's ``init-args-num-cpus``; default all). ``on_report`` gets,
    in this process and in order, every object the ServerApp passed to :func:`emit_report`; an
    exception that ends a ServerApp given as an object or a :class:`ServerAppFactory` is raised here.
    ``output`` gets each line ``flwr run --stream`` prints (the run's logs). Raises
    :class:`SimulationFailed` when the run does not finish successfully."""
    if num_supernodes < 1:
        raise ConfigError(f"num_supernodes must be at least 1, got {num_supernodes}")
    if int(num_cpus) != num_cpus or num_cpus < 1:
        raise ConfigError(
            f"num_cpus per client must be a whole number ≥ 1 (Flower's setting), got {num_cpus}"
        )
    if ray_address and ray_num_cpus is not None:
        raise ConfigError("ray_num_cpus sizes a local Ray instance; an existing cluster has its own")
    if not num_gpus >= 0:
        raise ConfigError(f"num_gpus per client must be ≥ 0, got {num_gpus}")
    work = Path(tempfile.mkdtemp(prefix="fedmerge-sim-"))
    try:
        home, app_dir = work / "flwr-home", work / "app"
        home.mkdir()
        app_dir.mkdir()
        reports = work / "reports.bin"
        run_env = superlink_env(home, reports, env, ray_address)
        serverapp = _component(server_app, SERVERAPP_ENV, "server_app", work, run_env)
        clientapp = _component(client_app, CLIENTAPP_ENV, "client_app", work, run_env)
        if not (isinstance(server_app, str) and isinstance(client_app, str)):
            (app_dir / f"{_SHIM}.py").write_text(_SHIM_SOURCE)
        (app_dir / "pyproject.toml").write_text(_app_pyproject(serverapp, clientapp, run_config or {}))
        port = _free_port()  # one port serves the Runtime, Control and Fleet APIs
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
            "insecure = true\n"
        )
        log = work / "superlink.log"
        with open(log, "wb") as log_f:
            superlink = subprocess.Popen(
                [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
                 "--port", str(port), "--database", ":flwr-in-memory:",
                 "--disable-runtime-dependency-installation"],
                env=run_env, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            _wait_for_port(port, superlink, log)
            federation = (
                f"num-supernodes={num_supernodes} client-resources-num-cpus={int(num_cpus)} "
                f"client-resources-num-gpus={float(num_gpus)}"
            )
            if ray_num_cpus is not None:
                federation += f" init-args-num-cpus={int(ray_num_cpus)}"
            errors: list[BaseException] = []

            def on_item(item: Any) -> None:
                if isinstance(item, tuple) and len(item) == 2 and item[0] == _ERROR_MARK:
                    errors.append(item[1])
                elif on_report is not None:
                    on_report(item)

            try:
                _flwr_run(app_dir, federation, run_env, reports, on_item, output)
            except SimulationFailed as failed:
                if errors:  # the ServerApp's own exception (RoundAborted, ConfigError …), as raised there
                    raise errors[-1] from failed
                raise
        finally:
            _stop(superlink)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _flwr_run(
    app_dir: Path,
    federation: str,
    env: dict[str, str],
    reports: Path,
    on_report: Callable[[Any], None] | None,
    output: Callable[[str], None] | None,
) -> None:
    proc = subprocess.Popen(
        [_bin("flwr"), "run", str(app_dir), "local", "--stream", "--federation-config", federation],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    reader = _ReportReader(reports, on_report)
    tail: list[str] = []
    done = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            del tail[:-200]
            if output is not None:
                output(line.rstrip("\n"))
        done.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        while not done.wait(0.1):
            reader.poll()
        proc.wait()
    finally:
        _stop(proc)
    reader.poll()
    text = "".join(tail)
    if proc.returncode != 0 or "Exit Code:" in text:  # flwr prints "Exit Code: N" on any failed exit
        raise SimulationFailed(f"{failure_line(text)}\n{text[-4000:]}")


def failure_line(log: str) -> str:
    """The one line that says why a simulation run failed: the last exception its log names."""
    found = [m.group(0) for m in _EXCEPTION_LINE.finditer(log)]
    if not found:
        return "simulation failed (see its log below)"
    cause = f" (first: {found[0]})" if found[0] != found[-1] else ""  # a chain prints its cause first
    return f"simulation failed: {found[-1]}{cause}"


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Failed|Exit)\b: .*$", re.MULTILINE)
