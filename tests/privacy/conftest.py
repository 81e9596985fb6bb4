"""Shared fixtures of the privacy tests: seeded random deltas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

SHAPES = {"layer.weight": (16, 32), "layer.bias": (32,), "head": (4, 8)}


MakeDelta = Callable[..., dict[str, torch.Tensor]]


def _make_delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.fixture
def make_delta() -> MakeDelta:
    """make_delta(seed, scale=1.0): a seeded N(0, scale²) delta over SHAPES."""
    return _make_delta


@pytest.fixture
def delta() -> dict[str, torch.Tensor]:
    return _make_delta(0)
