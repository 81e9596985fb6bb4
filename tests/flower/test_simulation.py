"""Rounds on Flower's simulation runtime (Ray) against a real store: faults, interop, min-valid, resume,
and a two-node Ray cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.federation import RoundAborted
from fedmerge.store import ModelStore

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]


def _reasons(store: Path, ref: str) -> dict[str, tuple[bool, str | None]]:
    with ModelStore.open(store) as st:
        return {c.client_id: (c.accepted, c.reason) for c in st.get(ref).contributors}


def test_faulty_and_dense_replies_are_recorded_and_the_rest_is_merged(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    plan = ["ok", "truncated", "duplicate", "crash", "dense", "stale"]
    reports = simulate(store, scripted_client_app(plan), len(plan), min_clients=6, min_valid=2)
    assert len(reports) == 1 and reports[0].version_id == "v000002"
    outcomes = {o.node_id: o for o in reports[0].outcomes}
    assert len(outcomes) == 6
    with ModelStore.open(store) as st:
        version = st.get("latest")
        assert version.round == 1 and version.parents == ("v000001",)
        assert version.method == "ties" and version.params["divisor"] == "weight"
        contributors = version.contributors
        accepted = sorted(c.client_id for c in contributors if c.accepted)
        reasons = [c.reason or "" for c in contributors if not c.accepted]
        # client-0, the node that also calls itself client-0 (identity is the node: it is merged under
        # a qualified label) and the dense client are merged
        assert len(accepted) == 3 and "client-0" in accepted, (accepted, reasons)
        assert any(a.startswith("client-0@node-") for a in accepted)
        assert any(a.startswith("node-") for a in accepted)  # the plain dense Flower client
        assert len(reasons) == 3
        joined = " | ".join(reasons)
        assert "stale" in joined and "v000000" in joined
        assert "simulated crash" in joined
        assert "PayloadSizeMismatch" in joined or "MalformedPackage" in joined
        assert version.metrics["accepted"] == 3.0 and version.metrics["rejected"] == 3.0
        assert 0.0 <= version.metrics["server-accuracy"] <= 1.0
        # the merged delta is not zero and the new weights differ from the base
        delta = st.load_delta(version)
        assert any(float(t.abs().sum()) > 0 for t in delta.values())
        assert st.verify().ok


def test_too_few_valid_replies_commit_nothing_and_retry(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    with pytest.raises(RoundAborted, match=r"min-valid=2 valid replies in 2 attempt\(s\)") as info:
        simulate(
            store, scripted_client_app(["ok", "crash", "crash"]), 3, min_clients=3, min_valid=2, max_retries=1
        )
    assert "simulated crash" in str(info.value)
    with ModelStore.open(store) as st:
        assert [v.id for v in st.list()] == ["v000001"]  # only the base


def test_resume_continues_from_latest_round_and_rejects_older_base(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    """A second run (new ServerApp, new SuperNodes) continues at round 2 from v000002."""
    store = tmp_path / "store"
    common: dict[str, Any] = {"min_clients": 3, "min_valid": 2}
    first = simulate(store, scripted_client_app(["ok", "ok", "ok"]), 3, **common)
    assert [r.version_id for r in first] == ["v000002"]
    second = simulate(store, scripted_client_app(["ok", "ok", "stale"]), 3, num_rounds=2, **common)
    assert [(r.round, r.base_version_id, r.version_id) for r in second] == [
        (2, "v000002", "v000003"),
        (3, "v000003", "v000004"),
    ]
    assert all("stale" in (o.reason or "") for r in second for o in r.rejected)
    with ModelStore.open(store) as st:
        rounds = [v.round for v in st.list()]
        assert sorted(r for r in rounds if r is not None) == [1, 2, 3]  # no round committed twice
        assert st.get("latest").parents == ("v000003",)


# ---------------------------------------------------------------- a Ray cluster of two nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head node and a second node on localhost (``ray start``, one CPU each, their own temp dirs);
    every process they started is ended by pid in teardown (never ``ray stop``, which would end other
    Ray instances on the machine)."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    # short: Ray's Unix socket paths live under the temp dir and must stay below 108 characters
    root = Path(tempfile.mkdtemp(prefix="fm-ray-", dir="/tmp"))
    head_dir, worker_dir = root / "head", root / "worker"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def ray_start(args: list[str], temp_dir: Path) -> None:
        proc = subprocess.run(
            [ray, "start", *args, *common], env={**env, "RAY_TMPDIR": str(temp_dir)}, check=False,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"ray start {args}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"

    def ours() -> list[psutil.Process]:
        """The cluster's daemons (their command lines name its session under ``root``) and children."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if str(root) in " ".join(proc.info.get("cmdline") or []):
                found[proc.pid] = proc
                with contextlib.suppress(psutil.Error):
                    found.update({c.pid: c for c in proc.children(recursive=True)})
        return list(found.values())

    try:
        head = ["--head", f"--port={port}", f"--temp-dir={head_dir}", "--include-dashboard=false"]
        ray_start(head, head_dir)
        ray_start([f"--address=127.0.0.1:{port}"], worker_dir)
        yield f"127.0.0.1:{port}"
    finally:
        started = ours()
        for proc in started:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(started, timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def _node_marking_client_app(folder: Path) -> ClientApp:
    """fedmerge's ClientApp that also records the Ray node it ran on (a file named by the node id)."""
    from fedmerge_clients.app import train_reply

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        import ray

        (folder / ray.get_runtime_context().get_node_id()).touch()
        return train_reply(message, context)

    return app


@pytest.mark.integration
@pytest.mark.slow
def test_simulation_attaches_to_a_two_node_ray_cluster(tmp_path: Path, ray_cluster: str) -> None:
    """``ray_address`` runs the ClientApps on the existing cluster: with one CPU per node and one per
    client, the two nodes' actors both train, and the round commits a version."""
    from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app

    store, nodes_seen = tmp_path / "store", tmp_path / "nodes"
    nodes_seen.mkdir()
    reports: list[RoundReport] = []
    run_simulation_app(
        ServerAppFactory("fedmerge_server.app:make_server_app"),
        _node_marking_client_app(nodes_seen),
        num_supernodes=4,
        run_config={  # actors start on the cluster after the round's messages are out: a long deadline
            "store": str(store),
            "num-rounds": 1,
            "min-clients": 4,
            "min-valid": 2,
            "round-deadline-s": 900.0,
        },
        ray_address=ray_cluster,
        on_report=reports.append,
    )
    assert [r.version_id for r in reports] == ["v000002"] and len(reports[0].accepted) == 4, reports
    assert len(list(nodes_seen.iterdir())) == 2, "the clients did not run on both Ray nodes"
    with ModelStore.open(store) as st:
        assert st.get("latest").round == 1 and st.verify().ok
