"""SIGKILL of the server side (the process running the ServerApp and the simulation) mid-round and
mid-commit, then a new run on the same store: nothing committed is lost or changed, ``verify()``
passes, no round is committed twice, and the new run continues at ``latest.round + 1``.

The server side runs under ``sim_worker.py`` (its own process; its descendants are the SuperLink, the
``flwr-simulation`` process that runs the ServerApp, and Ray's workers). Mid-commit kills use the
store's ``FEDMERGE_STORE_KILL_AT`` hook (the ServerApp's process SIGKILLs itself after the N-th write
step of the round's commit: a blob staged, in ``fedmerge/store/staging.py``, or a later step of the
commit, in ``fedmerge/store/model_store.py``); mid-round kills come from this process while every
client is held in training by an injected straggler delay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.clientapp import ClientApp

from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore
from fedmerge.store.faults import KILL_AT_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sim_worker.py")
NODES = 3
COMMON: dict[str, Any] = {
    "min-clients": NODES,
    "min-valid": 2,
    "local-epochs": 1,
    "lr": 0.05,
    "num-rounds": 1,
}

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]
Snapshot = dict[str, tuple[str, int | None, tuple[str, ...], tuple[tuple[str, bool], ...]]]


class ServerSide:
    """The worker process and every descendant seen while it ran, all killed by pid at the end."""

    def __init__(self, store: Path, overrides: dict[str, Any], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(store), str(NODES), json.dumps({**COMMON, **overrides})],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.seen: dict[int, psutil.Process] = {}
        self.serverapp: dict[int, psutil.Process] = {}  # Flower's flwr-simulation: runs the ServerApp

    def track(self) -> None:
        """Remember the current descendants (Ray's processes) so they can be killed after the worker."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
                with contextlib.suppress(psutil.Error):
                    if any("flwr-simulation" in part for part in child.cmdline()):
                        self.serverapp.setdefault(child.pid, child)

    def serverapp_died(self) -> bool:
        """The process that ran the ServerApp was seen and is gone (SIGKILLed by the store's hook)."""
        return bool(self.serverapp) and not any(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.serverapp.values()
        )

    def wait(self, timeout_s: float, until: Callable[[], bool] | None = None) -> int | None:
        """Poll until the worker exits (its status) or ``until()`` holds (None); fail at the timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.track()
            status = self.proc.poll()
            if status is not None:
                return status
            if until is not None and until():
                return None
            time.sleep(0.2)
        raise AssertionError(f"server side still running after {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the worker, then every descendant it had (by pid; ``kill`` checks pid reuse)."""
        self.track()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        for child in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(list(self.seen.values()), timeout=15)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout is not None else ""


@pytest.fixture
def server_sides() -> Iterator[list[ServerSide]]:
    started: list[ServerSide] = []
    yield started
    for side in started:
        side.kill()


@pytest.fixture(scope="module")
def round1_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the base (v000001) and round 1 (v000002), made by the worker without faults."""
    store = tmp_path_factory.mktemp("round1") / "store"
    home = tmp_path_factory.mktemp("flwr-home-round1")
    env = {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    side = ServerSide(store, {}, env)
    try:
        status = side.wait(240)
    finally:
        side.kill()
    assert status == 0, side.output()[-3000:]
    with ModelStore.open(store) as st:
        assert sorted((v.id, v.round or 0) for v in st.list()) == [("v000001", 0), ("v000002", 1)]
    return store


def snapshot(store: Path) -> Snapshot:
    with ModelStore.open(store) as st:
        return {
            v.id: (
                v.content_hash,
                v.round,
                tuple(v.parents),
                tuple((c.client_id, c.accepted) for c in v.contributors),
            )
            for v in st.list()
        }


def check_whole(store: Path, before: Snapshot) -> int:
    """verify() passes, every version of ``before`` is unchanged, rounds are unique; the latest round."""
    after = snapshot(store)
    assert {vid: after[vid] for vid in before} == before, "a committed version was lost or changed"
    with ModelStore.open(store) as st:
        report = st.verify()
        assert report.ok, [p.message for p in report.problems]
        rounds = [v.round for v in st.list() if v.round is not None]
        assert len(rounds) == len(set(rounds)), f"a round was committed twice: {rounds}"
        latest = st.get("latest")
        return latest.round or 0


def resume(store: Path, simulate: Simulate, scripted: Scripted, expected_round: int) -> None:
    """A new run on the same store commits ``expected_round`` on top of ``latest``."""
    with ModelStore.open(store) as st:
        latest = st.get("latest").id
    reports = simulate(store, scripted(["ok"] * NODES), NODES, min_clients=NODES, min_valid=2)
    assert [(r.round, r.base_version_id) for r in reports] == [(expected_round, latest)]
    assert reports[0].version_id is not None and len(reports[0].accepted) == NODES
    with ModelStore.open(store) as st:
        new = st.get("latest")
        assert new.id == reports[0].version_id and new.parents == (latest,)
        assert sorted(v.round or 0 for v in st.list()) == list(range(expected_round + 1))
        assert st.verify().ok


def kill_step(store: Path, step: str) -> int:
    """The write-step index of ``step`` in the next round's commit: one blob per delta tensor (staged
    in fedmerge/store/staging.py), then blobs-synced, manifest, catalog-insert, committed (the commit's
    steps in fedmerge/store/model_store.py)."""
    with ModelStore.open(store) as st:
        blobs = len(st.load_delta(st.get("latest")))
    return {"blob": 0, "manifest": blobs + 1, "catalog-insert": blobs + 2, "committed": blobs + 3}[step]


@pytest.mark.parametrize(
    ("step", "committed"),
    [("blob", False), ("manifest", False), ("catalog-insert", False), ("committed", True)],
)
def test_sigkill_mid_commit_then_resume(
    step: str,
    committed: bool,
    round1_store: Path,
    tmp_path: Path,
    server_sides: list[ServerSide],
    simulate: Simulate,
    scripted_client_app: Scripted,
) -> None:
    store = tmp_path / "store"
    shutil.copytree(round1_store, store)
    before = snapshot(store)
    side = ServerSide(store, {}, {KILL_AT_ENV: str(kill_step(store, step))})
    server_sides.append(side)
    status = side.wait(240, until=side.serverapp_died)  # the ServerApp's process killed itself
    assert status is None or status != 0, side.output()[-3000:]
    side.kill()  # the SuperLink and Ray's processes, orphaned by the kill
    latest_round = check_whole(store, before)
    # killed before the catalog transaction committed: round 2 is absent; after it: present, once
    assert latest_round == (2 if committed else 1)
    resume(store, simulate, scripted_client_app, expected_round=latest_round + 1)


def test_sigkill_mid_round_then_resume(
    round1_store: Path,
    tmp_path: Path,
    server_sides: list[ServerSide],
    simulate: Simulate,
    scripted_client_app: Scripted,
) -> None:
    store = tmp_path / "store"
    shutil.copytree(round1_store, store)
    before = snapshot(store)
    markers = tmp_path / "markers"
    markers.mkdir()
    # every client sleeps 600 s before training: the round is in flight until the kill
    slow = {"fault-straggler": 1.0, "fault-straggler-delay-s": 600.0, "round-deadline-s": 900.0}
    side = ServerSide(store, slow, {"FEDMERGE_TEST_MARKERS": str(markers)})
    server_sides.append(side)
    status = side.wait(240, until=lambda: any(markers.glob("train-r2-*")))
    assert status is None, side.output()[-3000:]
    side.kill()
    assert side.proc.returncode == -signal.SIGKILL
    assert check_whole(store, before) == 1
    assert snapshot(store) == before  # nothing at all was written by the killed round
    resume(store, simulate, scripted_client_app, expected_round=2)
