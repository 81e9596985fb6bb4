"""Shared helpers of the robust-aggregation tests: seeded honest federations with attackers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

SHAPES = {"w": (10, 12), "b": (12,)}
Federation = list[dict[str, torch.Tensor]]


def _federation(n_honest: int, seed: int = 0, spread: float = 0.3) -> Federation:
    g = torch.Generator().manual_seed(seed)
    centre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return [
        {k: v + spread * torch.randn(v.shape, generator=g) for k, v in centre.items()}
        for _ in range(n_honest)
    ]


@pytest.fixture
def honest() -> Callable[..., Federation]:
    """honest(n, seed=0, spread=0.3): n client deltas around a common random centre."""
    return _federation
