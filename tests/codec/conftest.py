"""Shared fixtures for codec tests: seeded heavy-tailed deltas and a package header."""

from __future__ import annotations

import pytest
import torch

from fedmerge.codec import PackageMeta
from fedmerge.codec.checksum import package_checksum, tensor_checksum
from fedmerge.v1 import delta_pb2


def heavy_tailed(shape: tuple[int, ...], seed: int, scale: float = 1e-3) -> torch.Tensor:
    """Student-t (3 dof) values: the heavy tails of real fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    return (normal / (chi2 / 3).sqrt() * scale).float()


def make_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "layers.0.attn.weight": heavy_tailed((64, 48), seed),
        "layers.0.attn.bias": heavy_tailed((64,), seed + 1),
        "layers.1.mlp.weight": heavy_tailed((96, 64), seed + 2),
        "norm.weight": heavy_tailed((7,), seed + 3),
    }


def resign(pkg: delta_pb2.DeltaPackage) -> bytes:
    """Recompute every checksum after a mutation: what a sender that means harm would do."""
    for td in pkg.tensors:
        td.checksum = tensor_checksum(td)
    pkg.checksum = package_checksum(pkg)
    return pkg.SerializeToString()


@pytest.fixture
def tails():  # type: ignore[no-untyped-def]
    """The heavy_tailed(shape, seed, scale) generator."""
    return heavy_tailed


@pytest.fixture
def resigner():  # type: ignore[no-untyped-def]
    """resign(pkg) -> bytes with every checksum recomputed."""
    return resign


@pytest.fixture
def meta() -> PackageMeta:
    return PackageMeta(client_id="hospital-3", round=7, base_version_id="v12", base_version_hash="ab" * 32)


@pytest.fixture
def delta() -> dict[str, torch.Tensor]:
    return make_delta()
