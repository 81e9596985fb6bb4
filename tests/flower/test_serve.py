"""``fedmerge serve`` end to end: the command a deployment runs on the aggregation host.

Each test starts ``fedmerge serve --store S --certificates C --port P`` (TLS and SuperNode
authentication on, its defaults) as a subprocess on a free port, registers SuperNode public keys with
``flwr supernode register``, starts ``flower-supernode`` processes, and checks what an operator sees:

* two registered SuperNodes run ``flwr run . fedmerge-serve`` for 2 rounds, and the store then holds
  the base and the two committed versions with their lineage and contributors; SIGTERM to
  ``fedmerge serve`` stops the SuperLink and everything it started (no orphan);
* a SuperNode whose key was never registered is refused (its activation fails, it logs Flower's exit
  code 305 ``SUPERNODE_CONNECTION_ERROR`` and exits non-zero; ``flwr supernode list`` shows only the
  registered node) while a registered one in the same deployment is online; SIGINT to
  ``fedmerge serve`` stops everything.

The SuperLink binds ``fedmerge serve``'s default address 0.0.0.0; clients use 127.0.0.1 (the test
server certificate names 127.0.0.1 and localhost). Fast tests at the end check the command line and
the refusals that happen before anything starts.

Certificates, keys, ports and process handling come from ``test_deployment.py``. Every process
started here, and every descendant seen while it ran, is ended by its pid at teardown, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import CliRunner

from fedmerge.errors import ConfigError
from fedmerge.flower.cli import app as flower_cli
from fedmerge.flower.server.serve import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    default_state_dir,
    instructions,
    serve_forever,
    superlink_argv,
)
from fedmerge.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent))

from test_deployment import (  # helpers shared with the plain-SuperLink deployment test
    BIN,
    ROOT,
    Deployment,
    deployment_env,
    free_port,
    make_certificates,
    make_node_keys,
    run_flwr,
    wait_for_port,
)

CONNECTION = "fedmerge-serve"
SUPERNODE_CONNECTION_ERROR = 305  # flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR


@dataclass
class Served(Deployment):
    """A deployment whose teardown also ends every descendant seen while it ran (by pid)."""

    seen: dict[int, float] = field(default_factory=dict)  # pid → create time of each descendant seen

    def descendants(self, proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
        """The live descendants of ``proc`` (recorded for teardown)."""
        found = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.seen[child.pid] = child.create_time()
                    found.append(child)
        return found

    def stop(self) -> None:
        for proc in self.procs:
            self.descendants(proc)
        super().stop()
        for p in _still_running(self.seen):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _still_running(seen: dict[int, float]) -> list[psutil.Process]:
    """Those of ``seen`` that still run: same pid *and* create time, not a zombie."""
    alive = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    dep = Served(*deployment_env(tmp_path))
    yield dep
    dep.stop()


def _start_serve(dep: Served, tmp_path: Path) -> tuple[int, Path, Path, subprocess.Popen[bytes]]:
    """``fedmerge serve`` on a free port (default bind address 0.0.0.0); the connection in config.toml."""
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    store = tmp_path / "store"
    home = Path(dep.env["FLWR_HOME"])
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    serve = dep.start(
        "serve",
        [str(BIN / "fedmerge"), "serve", "--store", str(store), "--certificates", str(certs),
         "--port", str(port), "--create-store"],
    )  # fmt: skip
    wait_for_port(port, serve, 60)
    return port, certs, store, serve


def _start_supernode(
    dep: Served, name: str, port: int, certs: Path, key: Path, partition: int
) -> subprocess.Popen[bytes]:
    return dep.start(
        name,
        [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(certs / "ca.crt"),
            "--auth-supernode-private-key", str(key),
            "--port", str(free_port()),
            "--node-config", f'partition-id={partition} num-partitions=2 client-id="inst-{partition}"',
        ],
    )  # fmt: skip


def _register(dep: Served, public: Path, name: str) -> int:
    """``flwr supernode register KEY.pub``; returns the node id the SuperLink assigned."""
    args = ["supernode", "register", str(public), CONNECTION, "--name", name, "--format", "json"]
    registered = run_flwr(dep, args, 60)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    found = re.search(r'"node-id":\s*(\d+)', registered.stdout)
    assert found is not None, registered.stdout
    return int(found.group(1))


def _listed(dep: Served) -> list[dict[str, Any]]:
    listed = run_flwr(dep, ["supernode", "list", CONNECTION, "--format", "json"], 60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    doc = json.loads(listed.stdout)
    assert doc.get("success") is True, doc
    nodes: list[dict[str, Any]] = doc["nodes"]
    return nodes


def _stop_with(dep: Served, serve: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    """Send ``sig`` to ``fedmerge serve`` alone; wait; assert that nothing it started still runs."""
    started = dep.descendants(serve)
    names = [" ".join(p.cmdline()) for p in started]
    assert any("flower-superlink" in n for n in names), names
    assert any("flower-superexec" in n for n in names), names  # the SuperLink's ServerApp launcher
    mine = {p.pid: p.create_time() for p in started}
    serve.send_signal(sig)
    code = serve.wait(timeout=45)
    end = time.monotonic() + 15
    while _still_running(mine) and time.monotonic() < end:
        time.sleep(0.2)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _still_running(mine)]
    assert left == [], f"still running after {sig.name} to fedmerge serve: {left}"
    return int(code)


@pytest.mark.integration
@pytest.mark.slow
def test_serve_runs_two_rounds_with_registered_supernodes_and_stops_on_sigterm(
    tmp_path: Path, served: Served
) -> None:
    port, certs, store, serve = _start_serve(served, tmp_path)
    banner = (served.logs / "serve.log").read_text()
    assert f":{port}" in banner and "flwr run" in banner and "flwr supernode register" in banner
    keys = [make_node_keys(tmp_path, f"node{i}") for i in range(2)]
    for i, (_, public) in enumerate(keys):
        _register(served, public, f"node{i}")
    for i, (private, _) in enumerate(keys):
        _start_supernode(served, f"supernode{i}", port, certs, private, i)
    run_config = f"store='{store}' num-rounds=2 min-clients=2 min-valid=2 local-epochs=1"
    result = run_flwr(served, ["run", ".", CONNECTION, "--stream", "--run-config", run_config], 300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + served.tail()

    with ModelStore.open(store) as st:
        versions = {v.id: v for v in st.list()}
        base = [v for v in versions.values() if v.round is None]
        assert len(base) == 1 and base[0].parents == ()
        chain = sorted((v for v in versions.values() if v.round is not None), key=lambda v: v.round or 0)
        assert [v.round for v in chain] == [1, 2], served.tail()
        assert chain[0].parents == (base[0].id,) and chain[1].parents == (chain[0].id,)
        assert st.resolve("latest") == chain[1].id
        for version in chain:
            assert sorted(c.client_id for c in version.contributors if c.accepted) == ["inst-0", "inst-1"]
            assert version.method == "ties"
        report = st.verify()
        assert report.ok, report.problems  # the SuperLink's state is kept out of the store directory
    assert (default_state_dir(store) / "superlink.db").is_file()

    _stop_with(served, serve, signal.SIGTERM)


@pytest.mark.integration
@pytest.mark.slow
def test_unregistered_supernode_is_refused_and_registered_one_is_online(
    tmp_path: Path, served: Served
) -> None:
    port, certs, _, serve = _start_serve(served, tmp_path)
    good_key, good_public = make_node_keys(tmp_path, "registered")
    rogue_key, _ = make_node_keys(tmp_path, "unregistered")
    good_id = _register(served, good_public, "registered")
    good = _start_supernode(served, "supernode-registered", port, certs, good_key, 0)
    rogue = _start_supernode(served, "supernode-unregistered", port, certs, rogue_key, 1)
    code = rogue.wait(timeout=90)
    log = (served.logs / "supernode-unregistered.log").read_text()
    # flower-supernode logs Flower's exit code 305 (SUPERNODE_CONNECTION_ERROR) and ends with status 1
    assert code != 0, log
    assert f"Exit Code: {SUPERNODE_CONNECTION_ERROR}" in log, log
    assert "Failed to initialize the connection to the SuperLink" in log, log
    assert "Failed to activate SuperNode" in log, log

    end = time.monotonic() + 60
    nodes = _listed(served)
    while not any(n["status"] == "online" for n in nodes) and time.monotonic() < end:
        time.sleep(1)
        nodes = _listed(served)
    assert good.poll() is None, served.tail()
    # the SuperLink knows only the registered key's node, and that node is connected
    assert [(n["node-id"], n["status"]) for n in nodes] == [(str(good_id), "online")], nodes

    _stop_with(served, serve, signal.SIGINT)


def test_superlink_argv_binds_host_and_port_with_tls_and_supernode_auth(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    argv = superlink_argv(tmp_path / "state", 9100, False, certs, True, host="10.0.0.5")
    assert argv[argv.index("--host") + 1] == "10.0.0.5" and argv[argv.index("--port") + 1] == "9100"
    assert not any(a in argv for a in ("--fleet-api-address", "--control-api-address", "--insecure"))
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(certs.resolve() / "ca.crt")
    assert "--enable-supernode-auth" in argv
    assert argv[argv.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    plain = superlink_argv(tmp_path / "state", DEFAULT_PORT, True, None, False)
    assert plain[plain.index("--host") + 1] == DEFAULT_HOST == "0.0.0.0"
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain


def test_superlink_argv_refuses_what_flower_would_refuse_later(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs TLS"):
        superlink_argv(tmp_path, DEFAULT_PORT, True, None, True)
    with pytest.raises(ConfigError, match="TLS needs --certificates"):
        superlink_argv(tmp_path, DEFAULT_PORT, False, None, True)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match=r"lacks \['server.pem', 'server.key'\]"):
        superlink_argv(tmp_path, DEFAULT_PORT, False, tmp_path / "partial", True)
    with pytest.raises(ConfigError, match="--port 0"):
        superlink_argv(tmp_path, 0, True, None, False)


def test_serve_refuses_before_creating_anything(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = CliRunner().invoke(flower_cli, ["serve", "--store", str(store), "--port", str(free_port())])
    assert result.exit_code == 2 and "TLS needs --certificates" in result.output  # TLS + auth by default
    assert not store.exists() and not default_state_dir(store).exists()
    with pytest.raises(ConfigError, match="inside the store"):
        serve_forever(store, insecure=True, supernode_auth=False, state_dir=store / "superlink")
    assert not store.exists()
    misspelt = CliRunner().invoke(
        flower_cli,
        ["serve", "--store", str(store), "--insecure", "--no-supernode-auth", "--port", str(free_port())],
    )
    assert misspelt.exit_code == 2 and len(misspelt.output.strip().splitlines()) == 1, misspelt.output
    assert "does not exist" in misspelt.output and "fedmerge init --store" in misspelt.output
    assert not store.exists() and not default_state_dir(store).exists()
    assert default_state_dir(store) == tmp_path / "store.superlink"


def test_serve_hints_fit_the_app_it_will_run(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    hf = instructions(
        tmp_path / "store", "0.0.0.0", 8000, certs, True, ROOT / "examples" / "hf_lora", ["localhost"]
    )
    assert "model-dir=" in hf and "data-path=" in hf and "partition-id" not in hf
    assert f"flwr run {ROOT / 'examples' / 'hf_lora'} fedmerge --stream" in hf and "min-clients=3" in hf
    assert "flwr supernode register supernodes/NAME.pub fedmerge --name NAME" in hf
    assert "own --port" in hf and "<this-host>:8000" in hf  # the certificate names only loopback
    public = instructions(
        tmp_path / "store", "0.0.0.0", 8000, certs, True, ROOT, ["agg.example.org", "127.0.0.1"]
    )
    assert "--superlink agg.example.org:8000" in public and "data-path=" in public
    with pytest.raises(ConfigError, match="does not parse"):
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "pyproject.toml").write_text("[tool.flwr.app.config\n")
        instructions(tmp_path / "store", "0.0.0.0", 8000, None, False, tmp_path / "app")


def test_serve_refuses_a_certificate_for_another_host_before_starting(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")  # names 127.0.0.1 and localhost only
    store = tmp_path / "store"
    argv = ["serve", "--store", str(store), "--certificates", str(certs), "--port", str(free_port())]
    result = CliRunner().invoke(flower_cli, [*argv, "--public-host", "10.0.0.5"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not name '10.0.0.5'" in lines[0], result.output
    assert not store.exists() and not default_state_dir(store).exists()
