"""``fedmerge serve``: what a real deployment runs on the aggregation host.

A deployment is Flower's own: one ``flower-superlink`` on the aggregation host (Fleet API for the
SuperNodes, default port 9092; Control API 9093 for ``flwr run``), ``flower-supernode`` processes at
the institutions, and ``flwr run . <connection> --run-config "store='/srv/fedmerge-store'"`` to start
the fedmerge ServerApp, which runs next to the SuperLink and writes the embedded store there.
:func:`superlink_argv` builds the SuperLink command line (TLS and SuperNode authentication on by
default); :func:`serve_forever` runs it until interrupted and tears it down by its pid.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from fedmerge.errors import ConfigError
from fedmerge.store import ModelStore

CERT_FILES = ("ca.crt", "server.pem", "server.key")


def superlink_argv(
    state_dir: Path, fleet_port: int, insecure: bool, certificates: Path | None, supernode_auth: bool
) -> list[str]:
    """The ``flower-superlink`` command line; raises ConfigError naming a missing certificate file."""
    exe = shutil.which("flower-superlink") or str(Path(sys.executable).with_name("flower-superlink"))
    argv = [
        exe,
        "--fleet-api-address", f"0.0.0.0:{fleet_port}",
        "--database", str(state_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if insecure:
        if supernode_auth:
            raise ConfigError("--supernode-auth needs TLS; drop --insecure and pass --certificates DIR")
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
        "--ssl-ca-certfile", str(certificates / "ca.crt"),
        "--ssl-certfile", str(certificates / "server.pem"),
        "--ssl-keyfile", str(certificates / "server.key"),
    ]  # fmt: skip
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv


def serve_forever(
    store: Path, fleet_port: int, insecure: bool, certificates: Path | None, supernode_auth: bool
) -> int:
    """Open (or create) the store, start the SuperLink and wait; Ctrl-C stops it. Returns its exit code."""
    with ModelStore.open(store) as st:
        print(f"model store: {st.root}")
    state_dir = Path(store).resolve() / "superlink"
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = superlink_argv(state_dir, fleet_port, insecure, certificates, supernode_auth)
    proc = subprocess.Popen(argv)
    print(
        f"SuperLink pid {proc.pid}: SuperNodes connect to this host on port {fleet_port}; start rounds with\n"
        f"  flwr run . <connection> --run-config \"store='{Path(store).resolve()}'\""
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
