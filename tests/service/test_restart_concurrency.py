"""Durability and concurrency with real processes: SIGKILL the server mid-stream, 50 client processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from service_helpers import (
    TOKENS,
    ServerProcess,
    base_weights,
    make_store,
    server_config,
    write_expert,
    write_tokens,
)

from fedmerge.service.client import (
    FINAL_STATES,
    ClientOptions,
    ServiceCallError,
    get_submission,
    submit_expert,
    wait_merged,
)
from fedmerge.service.config import Limits
from fedmerge.service.intake import IntakeQueue
from fedmerge.service.server import IntakeServer
from fedmerge.service.worker import MergeWorker
from fedmerge.store import ModelStore
from fedmerge.v1 import intake_pb2

HERE = Path(__file__).parent
TOKEN = next(iter(TOKENS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def merged_counts(store_path: Path) -> dict[str, int]:
    """sha256 → how many committed versions list it as a contributor."""
    counts: dict[str, int] = {}
    with ModelStore.open(store_path) as store:
        assert store.verify().ok
        for v in store.list():
            for c in v.contributors:
                counts[c.submission_hash] = counts.get(c.submission_hash, 0) + 1
    return counts


def _kill_restart(tmp_path: Path, experts: int, kills: int) -> None:
    store = make_store(tmp_path, width=192)
    port = free_port()
    proc = ServerProcess(store, write_tokens(tmp_path / "tokens.txt"), tmp_path / "server.log", "--listen")
    proc.extra = ("--listen", f"127.0.0.1:{port}")
    paths = [write_expert(tmp_path, base_weights(width=192), s) for s in range(experts)]
    opts = ClientOptions(f"127.0.0.1:{port}", token=TOKEN)
    acked: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def submitter() -> None:
        try:
            for p in paths:
                r = submit_expert(opts, p, retries=60, backoff=0.1)
                acked.append((r.submission_id, r.sha256))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    proc.start()
    try:
        t = threading.Thread(target=submitter, daemon=True)
        t.start()
        for k in range(kills):
            target_acks = (k + 1) * experts // (kills + 1)
            while len(acked) < target_acks and t.is_alive():
                time.sleep(0.01)
            proc.kill()  # SIGKILL while submissions stream in and the worker merges
            time.sleep(0.2)
            proc.start()
        t.join(120)
        assert not errors, errors
        assert len(acked) == experts
        subs = [wait_merged(opts, sid, timeout=120) for sid, _ in acked]
    finally:
        proc.stop()
    assert all(s.state == intake_pb2.SUBMISSION_STATE_MERGED for s in subs), [s.reason for s in subs]
    counts = merged_counts(store)
    for sid, sha in acked:
        assert counts.get(sha) == 1, f"{sid} merged {counts.get(sha, 0)} times"
    with ModelStore.open(store) as s:
        head = s.get("continual")
        assert head.metadata["num_merged"] == experts
        assert [v.id for v in s.list() if v.method == "opcm"].__len__() == experts


def test_sigkill_during_submissions_loses_nothing_and_merges_once(tmp_path: Path) -> None:
    _kill_restart(tmp_path, experts=10, kills=2)


@pytest.mark.slow
def test_sigkill_many_times(tmp_path: Path) -> None:
    _kill_restart(tmp_path, experts=40, kills=8)


class _CrashAfterCommit(IntakeQueue):
    """A queue whose first mark_merged fails: the version is committed, the queue not updated."""

    crashed = False

    def mark_merged(self, ids: Iterable[str], version: str) -> None:
        if not self.crashed:
            self.crashed = True
            raise KeyboardInterrupt("simulated crash between store commit and queue update")
        super().mark_merged(ids, version)


def test_crash_between_commit_and_queue_update_is_reconciled(tmp_path: Path) -> None:
    store_path = make_store(tmp_path)
    intake = tmp_path / "intake"
    intake.mkdir()
    q = _CrashAfterCommit(intake)
    p = write_expert(tmp_path, base_weights(), 1)
    sub, _ = q.receive(
        client_id="a", fmt="checkpoint", base_version="", label="", total_size=p.stat().st_size,
        chunks=[p.read_bytes()],
    )  # fmt: skip
    with ModelStore.open(store_path) as store:
        w = MergeWorker(store, q, method="opcm", params={})
        with pytest.raises(KeyboardInterrupt):
            w.step()
        assert q.get(sub.id).state == "queued"
        committed = store.get("continual").id
    q.close()
    q2 = IntakeQueue(intake)
    with ModelStore.open(store_path) as store:
        w2 = MergeWorker(store, q2, method="opcm", params={})
        w2.recover()
        assert q2.get(sub.id).state == "merged" and q2.get(sub.id).version == committed
        assert w2.merger.num_merged == 1
        assert w2.step() is None  # nothing merged twice
        assert len([v for v in store.list() if v.method == "opcm"]) == 1
    q2.close()


def test_restart_with_another_method_is_refused(tmp_path: Path) -> None:
    store_path = make_store(tmp_path)
    srv = IntakeServer(server_config(store_path))
    srv.start()
    opts = ClientOptions(f"127.0.0.1:{srv.port}", token=TOKEN)
    wait_merged(
        opts, submit_expert(opts, write_expert(tmp_path, base_weights(), 0)).submission_id, timeout=60
    )
    srv.stop(0.5)
    from fedmerge.errors import ConfigError

    other = IntakeServer(server_config(store_path, method="continual_task_arithmetic"))
    with pytest.raises(ConfigError, match="track 'continual' was merged with opcm"):
        other.start()
    other.stop(0.1)


STALL_S = 180.0  # a wait fails only when nothing progressed for this long (never a total deadline)


def _outputs_as_they_finish(
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]], stall_s: float
) -> list[dict[str, str]]:
    """Each client process's last JSON line, in start order, once all exited 0; fails when no process
    has finished for ``stall_s`` s (a busy machine is slow, not stuck, while clients keep finishing)."""
    results: dict[int, dict[str, str]] = {}
    last_progress = time.monotonic()
    while len(results) < len(procs):
        for i, (proc, out_path, err_path) in enumerate(procs):
            if i in results or proc.poll() is None:
                continue
            assert proc.returncode == 0, (out_path.read_text(), err_path.read_text()[-2000:])
            results[i] = json.loads(out_path.read_text().strip().splitlines()[-1])
            last_progress = time.monotonic()
        if time.monotonic() - last_progress > stall_s:
            for proc, _, _ in procs:
                proc.kill()
            pytest.fail(
                f"no client process finished for {stall_s:.0f} s ({len(results)} of {len(procs)} done)"
            )
        time.sleep(0.1)
    return [results[i] for i in range(len(procs))]


def _merged_as_they_progress(
    opts: ClientOptions, ids: list[str], stall_s: float
) -> list[intake_pb2.Submission]:
    """Every submission in a final state; fails when none reached one for ``stall_s`` s."""
    final: dict[str, intake_pb2.Submission] = {}
    last_progress = time.monotonic()
    while len(final) < len(ids):
        for sid in ids:
            if sid not in final:
                try:
                    sub = get_submission(opts, sid)
                except ServiceCallError as exc:  # a busy server may answer UNAVAILABLE: ask again
                    if not exc.retryable:
                        raise
                    continue
                if sub.state in FINAL_STATES:
                    final[sid] = sub
                    last_progress = time.monotonic()
        if len(final) < len(ids):
            assert time.monotonic() - last_progress <= stall_s, (
                f"no submission merged for {stall_s:.0f} s ({len(final)} of {len(ids)} final)"
            )
            time.sleep(0.2)
    return [final[sid] for sid in ids]


def test_fifty_concurrent_client_processes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    # client-00 is an operator: it reads every client's submission (others read only their own)
    config = server_config(
        store, max_workers=64, limits=Limits(max_queued=64), operators=frozenset({TOKENS[TOKEN]})
    )
    srv = IntakeServer(config)
    srv.start()
    try:
        base = base_weights()
        paths = [write_expert(tmp_path, base, s) for s in range(50)]
        tokens = list(TOKENS)[:50]
        procs = []
        for i, (tok, p) in enumerate(zip(tokens, paths, strict=True)):
            out_path, err_path = tmp_path / f"client-{i}.out", tmp_path / f"client-{i}.err"
            with out_path.open("wb") as out, err_path.open("wb") as err:
                cmd = [sys.executable, str(HERE / "submit_client.py"), f"127.0.0.1:{srv.port}", tok, str(p)]
                procs.append((subprocess.Popen(cmd, stdout=out, stderr=err), out_path, err_path))
        results = _outputs_as_they_finish(procs, stall_s=STALL_S)
        ids = {r["submission_id"] for r in results}
        assert len(ids) == 50
        opts = ClientOptions(f"127.0.0.1:{srv.port}", token=TOKEN)
        subs = _merged_as_they_progress(opts, sorted(ids), stall_s=STALL_S)
        assert all(s.state == intake_pb2.SUBMISSION_STATE_MERGED for s in subs)
        assert sorted(s.client_id for s in subs) == sorted(TOKENS[t] for t in tokens)
        assert sorted(s.sequence for s in subs) == list(range(1, 51))
    finally:
        srv.stop(0.5)
    counts = merged_counts(store)
    assert sorted(counts.values()) == [1] * 50
