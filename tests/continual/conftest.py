"""Shared fixtures: small synthetic task vectors with known structure, built from seeded generators."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch


def random_expert(seed: int, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A task vector of a tiny model: two linear layers (one non-square), biases, a norm and an embedding."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": scale * torch.randn(11, 6, generator=g),
        "fc1.weight": scale * torch.randn(12, 6, generator=g),
        "fc1.bias": scale * torch.randn(12, generator=g),
        "norm.weight": scale * torch.randn(12, generator=g),
        "fc2.weight": scale * torch.randn(5, 12, generator=g),
        "fc2.bias": scale * torch.randn(5, generator=g),
    }


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: these tensors are tiny, and extra threads only contend on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def experts() -> list[dict[str, torch.Tensor]]:
    return [random_expert(100 + i, scale=0.5 + 0.1 * i) for i in range(6)]


@pytest.fixture
def make_expert() -> Callable[..., dict[str, torch.Tensor]]:
    return random_expert
