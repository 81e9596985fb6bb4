"""Crash safety: a committing process killed by a real SIGKILL never leaves a partial or damaged store.

Children are forked from a fork server (``store_worker.py``) that has already imported torch, so a
kill costs milliseconds. Two ways of choosing the kill point, both ending in ``SIGKILL``:
at every write step of a commit (``FEDMERGE_STORE_KILL_AT``, deterministic coverage), and after a
random delay sent from this process (``os.kill``), which lands anywhere, inside SQLite included.
After every kill the store is reopened and checked: ``verify`` passes (it hashes every blob and reads
every manifest against the catalog), every acknowledged version is there, ids are contiguous, and
``latest`` names the newest version. Each version's content is compared with what its committer wrote
when it first appears; the random-kill runs compare every version and the materialised ``latest``
again every ``FULL_CHECK_EVERY`` kills and after the last one (a full comparison after each of 200
kills grows with the store, quadratically in all).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fedmerge.store import ModelStore

STEPS_PER_COMMIT = 8  # 3 tensor blobs + 1 state blob, blobs-synced, manifest, catalog-insert, committed
FULL_CHECK_EVERY = 20


def run_child(server, kill_at: int, seed: int, n: int, delay: float | None, workers: int = 1):
    """Fork a committer; SIGKILL it after ``delay`` s if given. Return (status, {vid: round} acked)."""
    pid = server.spawn(f"commit {kill_at} {seed} {n} {workers}")
    if delay is not None:
        server.wait_for(f"ready {pid}")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # the child is at worst a zombie until reaped: the pid is still its own
    status, lines = server.reap(pid)
    errors = [line for line in lines if line.startswith("error")]
    assert not errors, errors
    acked = {p[2]: int(p[3]) for p in (line.split() for line in lines) if p[0] == "ack"}
    return status, acked


def check_store(
    path: Path, acked: dict[str, int], worker: ModuleType, compared: set[str] | None = None
) -> int:
    """Assert the store is whole and holds every acknowledged version intact; return its version count.

    ``compared``: ids whose content an earlier call compared (``verify`` guards them since); only the
    others are compared, and added. None: compare every version and the materialised ``latest``."""
    with ModelStore.open(path) as store:
        report = store.verify()
        assert report.ok, [p.message for p in report.problems]
        versions = store.list()
        ids = sorted(v.id for v in versions)
        assert ids == [f"v{i:06d}" for i in range(1, len(ids) + 1)], "ids must be contiguous"
        assert store.aliases()["latest"] == ids[-1]
        for vid, round_ in acked.items():
            assert store.get(vid).round == round_, f"acknowledged {vid} lost or changed"
        base = worker.base_weights()
        expected = {k: v.clone() for k, v in base.items()}
        by_id = {v.id: v for v in versions}
        for vid in ids[1:]:
            if compared is not None and vid in compared:
                continue
            version = by_id[vid]
            delta = store.load_delta(version)
            want = worker.expected_delta(version.round)
            assert delta.keys() == want.keys()
            for name in want:
                assert torch.equal(delta[name], want[name]), f"{vid} {name} holds other bytes"
            state = store.load_state(version)
            assert state is not None and state["count"].tolist() == [version.metrics["i"]]
        if compared is not None:
            compared.update(ids)
            return len(ids)
        for version in store.chain(by_id[ids[-1]])[1:]:
            for name, t in worker.expected_delta(version.round).items():
                expected[name] += t
        weights = store.materialize("latest")
        for name, t in expected.items():
            assert torch.allclose(weights[name], t, atol=1e-5), name
        return len(ids)


def test_sigkill_at_every_write_step_leaves_a_consistent_store(fork_server, worker: ModuleType) -> None:
    server, path = fork_server
    all_acked: dict[str, int] = {}
    statuses = []
    for kill_at in range(2 * STEPS_PER_COMMIT + 1):
        status, acked = run_child(server, kill_at, seed=kill_at + 1, n=2, delay=None)
        statuses.append(status)
        all_acked.update(acked)
        check_store(path, all_acked, worker)
    assert statuses[:-1] == [-signal.SIGKILL] * (2 * STEPS_PER_COMMIT), "each step must be reached and killed"
    assert statuses[-1] == 0, "past the last step the child commits both versions and exits"
    # a kill at step k of a commit leaves the k // STEPS_PER_COMMIT earlier commits of that child
    assert len(all_acked) == sum(k // STEPS_PER_COMMIT for k in range(2 * STEPS_PER_COMMIT)) + 2


def _random_kills(
    server, path: Path, worker: ModuleType, kills: int, seed: int, workers: int, max_delay: float
) -> int:
    rng = random.Random(seed)
    all_acked: dict[str, int] = {}
    killed = 0
    compared: set[str] = set()
    for i in range(kills):
        status, acked = run_child(
            server, -1, seed=100 + i, n=10_000, delay=rng.uniform(0.0, max_delay), workers=workers
        )
        killed += status == -signal.SIGKILL
        all_acked.update(acked)
        full = (i + 1) % FULL_CHECK_EVERY == 0 or i == kills - 1
        check_store(path, all_acked, worker, None if full else compared)
    return killed


def test_sigkill_at_50_random_times_loses_nothing(fork_server, worker: ModuleType) -> None:
    server, path = fork_server
    killed = _random_kills(server, path, worker, kills=50, seed=7, workers=1, max_delay=0.15)
    assert killed == 50, f"only {killed} of 50 children were still running when killed"


@pytest.mark.slow
def test_sigkill_at_200_random_times_with_parallel_blob_writers(fork_server, worker: ModuleType) -> None:
    server, path = fork_server
    killed = _random_kills(server, path, worker, kills=200, seed=11, workers=4, max_delay=0.1)
    assert killed == 200
