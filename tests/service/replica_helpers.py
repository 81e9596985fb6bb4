"""Helpers for the replica tests: a real PostgreSQL, replica processes, the OPCM reference merge."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fedmerge.aggregators.continual import create_continual
from fedmerge.service.client import ClientOptions, ServiceCallError, submit_expert
from fedmerge.service.intake import Submission
from fedmerge.service.replicas import SharedIntakeQueue
from fedmerge.service.worker import expert_task_vector
from fedmerge.store import ModelStore, Version
from fedmerge.store.s3 import S3BlobBackend

sys.path.insert(0, str(Path(__file__).parent.parent / "store"))

from pg_server import PgServer
from service_helpers import TOKEN

__all__ = [
    "PgServer",
    "ReplicaProcess",
    "audit_track",
    "lease_holder_pid",
    "opcm_reference",
    "push_anywhere",
    "track_chain",
]


class ReplicaProcess:
    """One ``serve-continual --catalog …`` replica in a subprocess (its own port file)."""

    def __init__(
        self,
        name: str,
        store: Path | str,
        data_dir: Path,
        catalog: str,
        tokens: Path,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.store, self.data_dir, self.catalog = name, store, data_dir, catalog
        self.tokens, self.log = tokens, log
        self.env = {**os.environ, **(env or {})}  # e.g. the object store's endpoint and credentials
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, lease_ttl_s: float = 2.0, timeout: float = 120.0, extra: Sequence[str] = ()) -> int:
        port_file = self.log.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "fedmerge.service.cli", "serve-continual",
            "--store", str(self.store), "--data-dir", str(self.data_dir), "--catalog", self.catalog,
            "--lease-ttl-s", str(lease_ttl_s), "--listen", "127.0.0.1:0", "--tokens", str(self.tokens),
            "--port-file", str(port_file), *extra,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        last = time.monotonic()
        size = 0
        while not port_file.exists():  # wait while the replica keeps writing its log (progress)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            grown = self.log.stat().st_size
            if grown != size:
                size, last = grown, time.monotonic()
            if time.monotonic() - last > timeout:
                raise RuntimeError(f"{self.name} did not start: {self.tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def track_chain(store: ModelStore, track: str = "continual") -> list[Version]:
    """The track's versions oldest first, following ``parents[1]`` back from the alias."""
    chain: list[Version] = []
    v: Version | None = store.get(track)
    while v is not None and v.kind != "full":
        chain.append(v)
        v = store.get(v.parents[1]) if len(v.parents) > 1 else None
    return list(reversed(chain))


def opcm_reference(
    store: ModelStore,
    subs: list[Submission],
    spool: Callable[[Submission], Path],
    params: dict[str, object] | None = None,
) -> dict[str, torch.Tensor]:
    """OPCM run directly, in one process, on ``subs`` in order: the merged task vector after the last
    (``spool``: where a submission's bytes are, e.g. the queue's ``spooled``)."""
    base = store.root_of(store.get("latest"))
    weights = store.load_delta(base)
    merger = create_continual("opcm", **(params or {}))
    merged: dict[str, torch.Tensor] = {}
    for sub in subs:
        tau = expert_task_vector(sub, spool(sub), base, weights, 1 << 30)
        merged = merger.add_expert(tau)
    return merged


def audit_track(
    store_path: Path | str,
    data: Path,
    url: str,
    expected: int,
    acked: set[str] | None = None,
    *,
    objects: S3BlobBackend | None = None,
    cache_dir: Path | None = None,
) -> None:
    """Every acked expert in exactly one version of one linear chain; the head equals direct OPCM
    on the same experts in the chain's order; ``store verify`` clean. With ``objects`` (an ``s3://``
    store) the experts' bytes are read back from the bucket into ``data``."""
    q = SharedIntakeQueue(data, url, objects=objects)
    with ModelStore.open(store_path, catalog=url, cache_dir=cache_dir) as store:
        report = store.verify()
        assert report.ok, report.problems
        chain = track_chain(store)
        opcm = [v for v in store.list() if v.method == "opcm"]
        assert sorted(v.id for v in chain) == sorted(v.id for v in opcm), "one linear chain, no fork"
        order = [c.submission_hash for v in chain for c in v.contributors]
        assert len(order) == len(set(order)) == expected, "each expert merged exactly once"
        subs = {s.sha256: s for s in q.all()}
        assert all(s.state == "merged" for s in subs.values())
        assert sorted(order) == sorted(subs)
        if acked is not None:
            assert {s.id for s in subs.values()} == acked, "the queue holds exactly the acknowledged experts"
        head = store.get("continual")
        assert head.metadata["num_merged"] == expected
        want = opcm_reference(store, [subs[h] for h in order], q.spooled)
        got = store.load_delta(head)
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
    q.close()


def lease_holder_pid(url: str) -> int | None:
    """The pid of the replica holding the track's lease (holder ids are ``host-pid-random``)."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder FROM leases WHERE track = 'continual'").fetchone()
    return None if row is None else int(str(row[0]).rsplit("-", 2)[1])


def push_anywhere(replicas: list[ReplicaProcess], path: Path, rng: random.Random, deadline_s: float) -> str:
    """Submit ``path`` at a random replica; on any failure try the next one (a client behind a load
    balancer). Gives up only after ``deadline_s`` seconds without success."""
    start = time.monotonic()
    i = rng.randrange(len(replicas))
    while True:
        replica = replicas[i % len(replicas)]
        i += 1
        if replica.alive and replica.port:
            try:
                opts = ClientOptions(f"127.0.0.1:{replica.port}", token=TOKEN)
                return submit_expert(opts, path, retries=1, backoff=0.05, timeout=60).submission_id
            except ServiceCallError:
                pass
        if time.monotonic() - start > deadline_s:
            raise AssertionError(f"{path.name} was not acknowledged by any replica in {deadline_s} s")
        time.sleep(0.05)
