"""``fedmerge serve``: what a real deployment runs on the aggregation host.

A deployment is Flower's own. In flwr 1.41 one ``flower-superlink`` serves its Fleet API (SuperNodes
at the institutions), Control API (``flwr run``, ``flwr supernode register``) and Runtime API (the
ServerApp it starts next to itself) over HTTPS on **one** port, ``--host``/``--port`` (fedmerge's
default 0.0.0.0:8000). ``flwr run . <connection> --run-config "store='/srv/fedmerge-store'"`` then
starts the fedmerge ServerApp on that host, which writes the embedded store there.

:func:`superlink_argv` builds the SuperLink command line (TLS and SuperNode authentication on by
default); :func:`serve_forever` runs it, forwards SIGINT/SIGTERM to it and ends it by its pid.
The SuperLink's own state (``superlink.db``) lives in a directory *beside* the store
(:func:`default_state_dir`), never inside it: the store owns its directory (``verify`` flags foreign
files).

Metrics (``metrics_port``): the Prometheus endpoint lives in this long-running process, so it is up
between runs and its counters keep growing across runs. The ServerApp of every run — a process the
SuperLink starts — inherits :data:`fedmerge.metrics.EVENTS_ENV` naming ``round-events.jsonl`` in the
state directory and appends one line per round to it; each scrape reads the new lines
(:func:`fedmerge.metrics.feed_registry`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge.metrics import (
    EVENTS_ENV,
    MetricsServer,
    check_metrics_bind,
    feed_registry,
    start_metrics_server,
)
from fedmerge.store import ModelStore, UnknownVersionError
from fedmerge.store.model_store import STORE_MARKER

CERT_FILES = ("ca.crt", "server.pem", "server.key")
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
EVENTS_FILE = "round-events.jsonl"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def default_state_dir(store: Path) -> Path:
    """Where the SuperLink keeps its database: ``<store>.superlink`` next to the store directory."""
    resolved = Path(store).resolve()
    return resolved.with_name(resolved.name + ".superlink")


def superlink_argv(
    state_dir: Path,
    port: int,
    insecure: bool,
    certificates: Path | None,
    supernode_auth: bool,
    host: str = DEFAULT_HOST,
) -> list[str]:
    """The ``flower-superlink`` command line binding ``host:port`` (Fleet, Control and Runtime APIs).

    Raises ConfigError for a port outside 1–65535, for SuperNode authentication without TLS, and for
    a certificate directory that lacks one of ``ca.crt``, ``server.pem``, ``server.key``.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in 1..65535")
    if not host:
        raise ConfigError("--host must name an address to bind (0.0.0.0 for every interface)")
    exe = shutil.which("flower-superlink") or str(Path(sys.executable).with_name("flower-superlink"))
    argv = [
        exe,
        "--host", host,
        "--port", str(port),
        "--database", str(state_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if insecure:
        if supernode_auth:
            raise ConfigError(
                "SuperNode authentication needs TLS: drop --insecure and pass --certificates DIR "
                "(or add --no-supernode-auth for a local test)"
            )
        return [*argv, "--insecure"]
    if certificates is None:
        raise ConfigError(
            "TLS needs --certificates DIR holding ca.crt, server.pem and server.key (or --insecure for tests)"
        )
    missing = [name for name in CERT_FILES if not (certificates / name).is_file()]
    if missing:
        raise ConfigError(
            f"certificate directory {certificates} lacks {missing}; expected {list(CERT_FILES)}"
        )
    argv += [
        "--ssl-ca-certfile", str(certificates.resolve() / "ca.crt"),
        "--ssl-certfile", str(certificates.resolve() / "server.pem"),
        "--ssl-keyfile", str(certificates.resolve() / "server.key"),
    ]  # fmt: skip
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv


def app_config(app: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the Flower app ``app`` (a directory); ``{}`` without one.

    A ``pyproject.toml`` that does not parse is ConfigError naming it.
    """
    pyproject = Path(app) / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    try:
        data = tomllib.loads(pyproject.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--app {app}: {pyproject} does not parse ({exc})") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return dict(table) if isinstance(table, dict) else {}


def node_config_hint(config: dict[str, Any]) -> str:
    """The ``--node-config`` an institution passes for the app's task (what its ClientApp reads)."""
    task = str(config.get("task", ""))
    if task == "hf_causal_lm":  # the base model's config.json + tokenizer, and a private text file
        return "client-id='NAME' model-dir='/models/my-lm' data-path='/data/notes.txt'"
    if task == "digits":
        return "client-id='NAME' data-path='/data/train.npz'"
    if task:
        return f"client-id='NAME' data-path='/data/...'  (read by task {task}'s load_data)"
    return "client-id='NAME' data-path='/data/...'"


def instructions(
    store: Path,
    host: str,
    port: int,
    certificates: Path | None,
    supernode_auth: bool,
    app: Path | None = None,
    names: list[str] | None = None,
) -> str:
    """What the operator and the institutions run against this SuperLink (printed at start).

    ``app`` is the Flower app ``flwr run`` will start (its ``[tool.flwr.app.config]`` decides the
    node config and ``min-clients`` shown); ``names`` are the hosts the TLS certificate names (the
    address shown is the first one that is not loopback).
    """
    public = [n for n in names or [] if n not in ("127.0.0.1", "localhost", "::1")]
    where = host if host not in ("0.0.0.0", "::") else (public[0] if public else "<this-host>")
    address = f"{where}:{port}"
    connection = [f'address = "{address}"']
    if certificates is None:
        connection.append("insecure = true")
    else:
        connection.append(f'root-certificates = "{certificates.resolve() / "ca.crt"}"')
    node_tls = "--insecure" if certificates is None else "--root-certificates ca.crt"
    auth = " --auth-supernode-private-key supernodes/NAME" if supernode_auth else ""
    config = app_config(app) if app is not None else {}
    app_arg = "." if app is None else str(app)
    min_clients = config.get("min-clients")
    run_config = f"store='{Path(store).resolve()}'" + (f" min-clients={min_clients}" if min_clients else "")
    lines = [
        f"SuperLink (Fleet, Control and Runtime APIs) listening on {host}:{port}",
        "operator, in $FLWR_HOME/config.toml:",
        "  [superlink.fedmerge]",
        *(f"  {line}" for line in connection),
    ]
    if supernode_auth:
        lines.append(
            "register each institution's public key:  flwr supernode register supernodes/NAME.pub fedmerge "
            "--name NAME  (keys: fedmerge certs DIR --supernode NAME)"
        )
    lines += [
        f"institutions:  flower-supernode --superlink {address} {node_tls}{auth} "
        f'--node-config "{node_config_hint(config)}"',
        "  (several SuperNodes on one host: give each its own --port, e.g. 9094, 9095, 9096)",
        f'start rounds:  flwr run {app_arg} fedmerge --stream --run-config "{run_config}"',
    ]
    return "\n".join(lines)


def serve_forever(
    store: Path,
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    certificates: Path | None = None,
    supernode_auth: bool = True,
    host: str = DEFAULT_HOST,
    state_dir: Path | None = None,
    grace_s: float = 15.0,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_allow_remote: bool = False,
    dashboard_port: int | None = None,
    dashboard_host: str = "127.0.0.1",
    dashboard_token: str | None = None,
    app: Path | None = None,
    public_hosts: list[str] | None = None,
    create_store: bool = False,
) -> int:
    """Open (or create) the store, run the SuperLink until it exits; returns its exit code.

    SIGINT and SIGTERM received by this process are forwarded to the SuperLink (which stops the
    ServerApp processes it started); if it is still alive ``grace_s`` seconds later it is killed.
    With ``metrics_port`` (0 = any free port) the Prometheus endpoint is served on
    ``metrics_host:metrics_port`` while the SuperLink runs (a non-loopback host needs
    ``metrics_allow_remote``; see the module docstring). With ``dashboard_port`` the read-only
    dashboard (:func:`fedmerge.dashboard.start_in_background`) is served on
    ``dashboard_host:dashboard_port``; off loopback it requires ``dashboard_token``.

    With TLS the certificates are checked first (:func:`fedmerge.flower.certs.check_certificates`: signed
    by ca.crt, valid, matching key, naming 127.0.0.1, the bind ``host`` unless it binds every interface,
    and each of ``public_hosts``, the names SuperNodes dial), so a certificate for the wrong host is one
    line here instead of exit code 305 on every SuperNode. ``app`` (the Flower app ``flwr run`` starts)
    only shapes the printed hints. A ``store`` that is not a fedmerge store is refused (ConfigError
    naming the path and ``fedmerge init``) unless ``create_store``, so a misspelt path never becomes an
    empty store.
    """
    root = Path(store).resolve()
    state = (state_dir or default_state_dir(root)).resolve()
    if state == root or root in state.parents:
        raise ConfigError(f"--state-dir {state} is inside the store {root}; put it beside the store")
    argv = superlink_argv(state, port, insecure, certificates, supernode_auth, host)  # validates first
    names: list[str] = []
    if not insecure and certificates is not None:
        from fedmerge.flower.certs import check_certificates

        dialled = [] if host in ("0.0.0.0", "::") else [host]
        names = check_certificates(certificates, [*dialled, *(public_hosts or [])])
    hints = instructions(root, host, port, None if insecure else certificates, supernode_auth, app, names)
    if metrics_port is not None:
        check_metrics_bind(metrics_host, metrics_allow_remote)
    if not (root / STORE_MARKER).is_file() and not create_store:
        what = "does not exist" if not root.exists() else f"is not a fedmerge store (no {STORE_MARKER})"
        raise ConfigError(
            f"--store {root} {what}; make it from your model with `fedmerge init --store {root} --base "
            "<model-dir>`, or pass --create-store to start empty (a built-in task's base is then committed "
            "by the first run)"
        )
    with ModelStore.open(root) as opened:
        # open the store now (or refuse a directory that is not one) rather than in round 1
        try:
            head = opened.get("latest")
        except UnknownVersionError:
            head = None
    state.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    metrics_server: MetricsServer | None = None
    if metrics_port is not None:
        metrics, _ = feed_registry(state / EVENTS_FILE)
        metrics.watch_store(root)
        if head is not None:
            metrics.show_version(head.id, head.round, _timestamp(head.created_at))
        metrics_server = start_metrics_server(
            metrics.registry, metrics_host, metrics_port, allow_remote=metrics_allow_remote
        )
        env[EVENTS_ENV] = str(state / EVENTS_FILE)
        print(f"serving metrics on {metrics_server.url}", flush=True)
    dashboard: Any = None
    if dashboard_port is not None:
        from fedmerge.dashboard import start_in_background

        try:
            dashboard = start_in_background(root, dashboard_host, dashboard_port, dashboard_token or None)
        except BaseException:
            if metrics_server is not None:
                metrics_server.stop()
            raise
        print(f"serving dashboard on {dashboard.url}", flush=True)
    received: list[int] = []
    started: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for child in started:
            if child.poll() is None:
                child.send_signal(signum)

    # handlers first: a signal that arrives while the SuperLink starts must reach it too
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(argv, env=env)
        started.append(proc)
        if received:  # interrupted between the handlers and the start
            proc.send_signal(received[0])
        print(f"model store: {root}\nSuperLink state: {state}\nSuperLink pid {proc.pid}", flush=True)
        print(hints, flush=True)
        kill_at: float | None = None
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if received and kill_at is None:
                    kill_at = time.monotonic() + grace_s
                if kill_at is not None and time.monotonic() > kill_at:
                    proc.kill()
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_server is not None:
            metrics_server.stop()
        if dashboard is not None:
            dashboard.stop()


def _timestamp(iso: str) -> float | None:
    """Seconds since the epoch of an ISO-8601 time (None when it does not parse)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None
