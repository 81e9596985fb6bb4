"""Continual mergers refuse experts above the magnitude bound and never absorb a refused expert;
OPCM's projection stays finite for experts inside the bound (issue: 3e38-valued expert)."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators.continual import available_continual, create_continual
from fedmerge.errors import IncompatibleDeltasError
from fedmerge.submission import ValueOutOfBounds, value_bound

SHAPES = {"a.weight": (12, 8), "b.weight": (8, 12), "b.bias": (8,)}


def _expert(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("method", sorted(available_continual()))
def test_a_3e38_expert_is_refused_and_the_state_is_unchanged(method: str) -> None:
    merger = create_continual(method)
    merger.add_expert(_expert(0))
    before = merger.state_dict()
    huge = {k: torch.full(s, 3e38) for k, s in SHAPES.items()}
    with pytest.raises(ValueOutOfBounds, match="above the bound"):
        merger.add_expert(huge)
    after = merger.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    merger.add_expert(_expert(1))  # a valid expert right after is merged
    assert merger.num_merged == 2


def test_opcm_projection_is_finite_for_experts_at_the_bound() -> None:
    bound = value_bound(SHAPES)
    merger = create_continual("opcm", alpha=0.5)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        expert = {k: bound * (2 * torch.rand(s, generator=g) - 1) for k, s in SHAPES.items()}
        merged = merger.add_expert(expert)
        assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    assert merger.num_merged == 4


def test_a_refused_expert_of_another_shape_leaves_opcm_as_it_was() -> None:
    merger = create_continual("opcm")
    merger.add_expert(_expert(0))
    before = merger.merged()
    with pytest.raises(IncompatibleDeltasError, match=r"'b.bias' has shape \(9,\)"):
        merger.add_expert({**_expert(1), "b.bias": torch.zeros(9)})
    assert all(torch.equal(before[k], merger.merged()[k]) for k in before)
