"""A real localhost deployment: ``flower-superlink`` + 2 ``flower-supernode`` processes with TLS and
SuperNode authentication, then ``flwr run .`` for 2 rounds against that SuperLink.

Everything is generated in the test: a CA and a server certificate for 127.0.0.1/localhost and one
ECDSA P-384 key pair per SuperNode (``fedmerge.flower.certs``, registered with ``flwr supernode register``),
a temporary ``FLWR_HOME`` whose ``config.toml`` names the SuperLink connection. Free ports are taken
from the OS. Every process started here is torn down by its pid in the fixture finalizer, pass or fail.
``flwr`` commands are ended only when they stop making progress (``fedmerge_testing/progress.py``),
never at a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedmerge.flower import certs
from fedmerge.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent))

from fedmerge_testing.progress import run_watched, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certificates(folder: Path) -> Path:
    """``ca.crt``, ``server.pem``, ``server.key`` for 127.0.0.1/localhost, as ``fedmerge certs`` makes them"""
    certs.make_certificates(folder, ["localhost"])
    return folder


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (as flower-supernode and ``flwr supernode register`` read)"""
    key = certs.make_node_key(folder, name)
    return key.private, key.public


@dataclass
class Deployment:
    """The processes of one localhost deployment; ``stop`` ends each by its pid (and its children)."""

    env: dict[str, str]
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(proc.pid).children(recursive=True)
                proc.terminate()
                _, alive = psutil.wait_procs([psutil.Process(proc.pid), *children], timeout=10)
                for p in alive:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.logs.glob("*.log")))


def deployment_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a localhost deployment's processes (its own FLWR_HOME, no telemetry, no
    runtime dependency installation, this venv's commands first) and its log folder."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("FEDMERGE_METRICS_EVENTS", None)  # a test's own serve process sets it when it wants it
    return env, logs


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(*deployment_env(tmp_path))
    yield dep
    dep.stop()


def run_flwr(
    dep: Deployment, args: list[str], idle_s: float, watch: Sequence[Path] = ()
) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS``, ended only after ``idle_s`` seconds without progress in its output, under ``watch``
    (e.g. the store a run commits to) or in the SuperNodes' logs (a ClientApp started or replied;
    :func:`progress.run_watched`). The SuperLink's log is not watched: it grows with every poll."""
    nodes = sorted(dep.logs.glob("supernode*.log"))
    return run_watched(
        [str(BIN / "flwr"), *args], cwd=ROOT, env=dep.env, idle_s=idle_s, watch=[*watch, *nodes]
    )


def wait_for_port(port: int, proc: subprocess.Popen[bytes], idle_s: float) -> None:
    """Until something listens on 127.0.0.1:``port``; ``proc`` exiting or spending no CPU for ``idle_s``
    seconds (:func:`progress.wait_until`) ends the wait, however slow a loaded machine starts it."""

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    wait_until(listening, f"something listening on 127.0.0.1:{port}", pid=proc.pid, idle_s=idle_s)


def start_secure_federation(dep: Deployment, tmp_path: Path, node_configs: list[str]) -> str:
    """A SuperLink with TLS and SuperNode authentication, and one registered, authenticated SuperNode per
    node config; ``flwr`` (through ``FLWR_HOME``) is pointed at it. Returns the SuperLink's address."""
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    address = f"127.0.0.1:{port}"
    (Path(dep.env["FLWR_HOME"]) / "config.toml").write_text(
        '[superlink]\ndefault = "fedmerge-test"\n\n[superlink.fedmerge-test]\n'
        f'address = "{address}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    superlink = dep.start(
        "superlink",
        [
            str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
            "--database", str(tmp_path / "superlink.db"), "--disable-runtime-dependency-installation",
        ],
    )  # fmt: skip
    wait_for_port(port, superlink, 30)
    keys = [make_node_keys(tmp_path, f"node{i}") for i in range(len(node_configs))]
    for i, (_, public) in enumerate(keys):
        registered = run_flwr(dep, ["supernode", "register", str(public), "--name", f"node{i}"], 60)
        assert registered.returncode == 0, registered.stdout + registered.stderr
    for i, ((private, _), node_config) in enumerate(zip(keys, node_configs, strict=True)):
        dep.start(
            f"supernode{i}",
            [
                str(BIN / "flower-supernode"), "--superlink", address,
                "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(private),
                "--port", str(free_port()), "--node-config", node_config,
            ],
        )  # fmt: skip
    return address


@pytest.mark.timeout(0)  # bounded by observed progress (run_flwr), not by a wall-clock guess
def test_tls_and_node_auth_deployment_runs_two_rounds(tmp_path: Path, deployment: Deployment) -> None:
    start_secure_federation(
        deployment, tmp_path, [f'partition-id={i} num-partitions=2 client-id="inst-{i}"' for i in range(2)]
    )
    store = tmp_path / "store"
    # only keys declared in pyproject's [tool.flwr.app.config] may be overridden by `flwr run`
    # the round deadline is the ServerApp's own (a product setting): generous, so that a loaded machine
    # slows the rounds down without failing them; the test's own wait follows progress (run_flwr)
    run_config = f"store='{store}' num-rounds=2 min-clients=2 min-valid=2 local-epochs=1 round-deadline-s=900"
    result = run_flwr(deployment, ["run", ".", "--stream", "--run-config", run_config], 300, [store])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + deployment.tail()
    with ModelStore.open(store) as st:
        rounds = sorted((v.round, v.id) for v in st.list() if v.round is not None)
        assert [r for r, _ in rounds] == [1, 2], result.stdout[-3000:] + deployment.tail()
        for _, vid in rounds:
            version = st.get(vid)
            accepted = sorted(c.client_id for c in version.contributors if c.accepted)
            assert accepted == ["inst-0", "inst-1"]
        assert st.verify().ok
