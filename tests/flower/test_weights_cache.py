"""The Federation keeps θ of its last commit instead of re-reading the chain: that θ must be what the
store materialises, bit for bit (fp32 weights), after any number of commits."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmerge.flower.downlink import apply_weights
from fedmerge.store import ModelStore


def test_sequential_fp32_application_equals_materialize(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "step": torch.tensor(7)}
    with ModelStore.open(tmp_path / "s") as store:
        version = store.commit_base(base, name="base")
        held = store.materialize(version)
        for r in range(1, 9):
            scale = 10.0**-r
            delta = {k: torch.randn(t.shape, generator=g) * scale for k, t in base.items() if k != "step"}
            version = store.commit(
                delta, parents=[version.id], method="fedavg", params={}, contributors=[], round=r,
                metrics={}, privacy=None,
            )  # fmt: skip
            held = apply_weights(held, delta)
            stored = store.materialize(version)
            assert held.keys() == stored.keys()
            for k in held:
                assert held[k].dtype == stored[k].dtype and torch.equal(held[k], stored[k]), (r, k)


def test_a_commit_is_refused_when_latest_moved_under_the_round(tmp_path: Path) -> None:
    import pytest

    from fedmerge.flower.server.commit import ConcurrentCommit, check_latest_unmoved

    with ModelStore.open(tmp_path / "s") as store:
        base = store.commit_base({"w": torch.zeros(3)}, name="base")
        check_latest_unmoved(store, base, 1)  # nothing moved: no error
        other = store.commit(
            {"w": torch.ones(3)}, parents=[base.id], method="fedavg", params={}, contributors=[], round=1,
            metrics={}, privacy=None,
        )  # fmt: skip
        with pytest.raises(ConcurrentCommit, match=f"latest moved from {base.id} to {other.id}"):
            check_latest_unmoved(store, base, 2)
