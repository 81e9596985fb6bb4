"""The kill audit of several replicas: three ``serve-continual`` processes on one store and one real
PostgreSQL, SIGKILLed at random moments while clients push through all three and retry elsewhere.

Every acknowledged expert is merged exactly once, in one linear chain whose head equals OPCM run
directly on the same experts in the same order, and ``store verify`` is clean."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from replica_helpers import PgServer, ReplicaProcess, audit_track, lease_holder_pid, push_anywhere
from service_helpers import TOKEN, base_weights, write_expert, write_tokens

from fedmerge.service.client import ClientOptions, wait_merged
from fedmerge.store import ModelStore
from fedmerge.v1 import intake_pb2

pytestmark = pytest.mark.slow


@pytest.fixture
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


def test_sigkill_of_any_replica_loses_nothing_and_merges_each_expert_once(
    tmp_path: Path, pg: PgServer
) -> None:
    url = pg.create_database(f"k_{uuid.uuid4().hex[:12]}")
    store = tmp_path / "store"
    with ModelStore.open(store, catalog=url) as s:
        s.commit_base(base_weights(width=64), name="tiny")
    data = tmp_path / "intake"
    tokens = write_tokens(tmp_path / "tokens.txt")
    replicas = [
        ReplicaProcess(f"r{i}", store, data, url, tokens, tmp_path / f"replica-{i}.log") for i in range(3)
    ]
    experts = 24
    paths = [write_expert(tmp_path, base_weights(width=64), s) for s in range(experts)]
    rng = random.Random(24)
    acked: list[str] = []
    errors: list[BaseException] = []
    try:
        for r in replicas:
            r.start()

        def client(k: int) -> None:
            local = random.Random(100 + k)
            try:
                for p in paths[k::3]:
                    acked.append(push_anywhere(replicas, p, local, deadline_s=300))
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(3)]
        for t in clients:
            t.start()
        kills = 0

        def kill_one(holder: bool = False) -> None:
            nonlocal kills
            time.sleep(rng.uniform(0.0, 0.3))
            victim = replicas[rng.randrange(3)]
            if holder:
                pid = lease_holder_pid(url)
                victim = next((r for r in replicas if r.proc is not None and r.proc.pid == pid), victim)
            if victim.alive:
                victim.kill()
                kills += 1
                victim.start()  # a restarted replica is a new holder: it must take the lease over

        # SIGKILLs at random moments while experts arrive (at random numbers of acknowledgements) …
        for threshold in sorted(rng.sample(range(2, experts - 2), 4)):
            while len(acked) < threshold and any(t.is_alive() for t in clients):
                time.sleep(0.01)
            kill_one()
        for t in clients:
            t.join()
        for _ in range(2):  # … and the lease holder while the queue is being merged
            kill_one(holder=True)
        assert not errors, errors
        assert kills == 6, f"only {kills} of 6 kills happened"
        assert len(set(acked)) == experts
        opts = ClientOptions(f"127.0.0.1:{replicas[0].port}", token=TOKEN)
        subs = [wait_merged(opts, sid, timeout=600) for sid in acked]
        assert all(s.state == intake_pb2.SUBMISSION_STATE_MERGED for s in subs), [s.reason for s in subs]
    except BaseException:
        for r in replicas:
            print(r.name, r.tail())
        raise
    finally:
        for r in replicas:
            r.stop()
    audit_track(store, data, url, expected=experts, acked=set(acked))
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT token FROM leases WHERE track = 'continual'").fetchone()
    assert row is not None
    token = int(row[0])
    assert token >= 3, f"the lease changed hands {token - 1} times; killed holders must be taken over"
