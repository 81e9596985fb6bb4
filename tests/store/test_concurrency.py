"""Two processes committing at once both succeed; a reader in a third never sees partial data."""

from __future__ import annotations

from types import ModuleType

import torch

from fedmerge.store import ModelStore


def test_two_committers_and_a_reader(fork_server, worker: ModuleType) -> None:
    server, path = fork_server
    reader = server.spawn("read 3.0")
    writers = [server.spawn(f"commit -1 {seed} 12 2") for seed in (1, 2)]
    acked: dict[str, int] = {}
    for pid in writers:
        status, lines = server.reap(pid)
        assert status == 0, lines
        assert not [line for line in lines if line.startswith("error")], lines
        acks = [line.split() for line in lines if line.startswith("ack")]
        assert len(acks) == 12
        acked.update({a[2]: int(a[3]) for a in acks})
    status, lines = server.reap(reader)
    assert status == 0 and not [line for line in lines if line.startswith("error")], lines
    reads = int(next(line for line in lines if line.startswith("reads")).split()[2])
    assert reads > 0
    with ModelStore.open(path) as store:
        assert store.verify().ok
        assert sorted(acked) == [f"v{i:06d}" for i in range(2, 26)], "24 distinct, gap-free ids"
        for vid, round_ in acked.items():
            version = store.get(vid)
            assert version.round == round_
            want = worker.expected_delta(round_)
            assert all(torch.equal(t, want[n]) for n, t in store.load_delta(vid).items())


def test_a_writer_blocked_past_busy_timeout_gets_a_retryable_error(tmp_path) -> None:
    from fedmerge.store import StoreBusyError

    path = tmp_path / "store"
    holder = ModelStore.open(path)
    root = holder.commit_base({"w": torch.zeros(3)}, name="b")
    blocked = ModelStore.open(path, busy_timeout=0.2)
    with holder.catalog.write():  # another writer holds the lock
        try:
            blocked.commit(
                {"w": torch.ones(3)},
                parents=[root.id],
                method="m",
                params={},
                contributors=[],
                round=1,
                metrics={},
                privacy=None,
            )
        except StoreBusyError as exc:
            assert exc.retryable and "retry" in str(exc)
        else:
            raise AssertionError("commit should have reported the busy catalog")
    assert [v.id for v in blocked.list()] == [root.id], "nothing became visible"
    retried = blocked.commit(
        {"w": torch.ones(3)},
        parents=[root.id],
        method="m",
        params={},
        contributors=[],
        round=1,
        metrics={},
        privacy=None,
    )
    assert retried.id == "v000002" and blocked.verify().ok
