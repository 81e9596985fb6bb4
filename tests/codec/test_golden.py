"""Committed packages of earlier encoders must keep decoding to exactly the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmerge.codec import PackageMeta, decode_package
from fedmerge.delta import SparseTensor

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(GOLDEN.glob("*.bin"))
META = PackageMeta(
    client_id="golden-client",
    round=3,
    base_version_id="v0007",
    base_version_hash="5e" * 32,
    num_examples=1234,
    metadata={"task": "golden", "optimizer": "adamw"},
)
SHAPES = {"layers.0.q_proj.weight": (32, 24), "layers.0.q_proj.bias": (32,), "head.weight": (10, 32)}


def test_golden_files_are_committed() -> None:
    assert len(FILES) >= 8
    assert {p.name[:2] for p in FILES} == {"v1", "v2", "v3"}  # every package format


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_package_decodes_unchanged(path: Path) -> None:
    decoded = decode_package(path.read_bytes(), expected_shapes=SHAPES)
    assert decoded.meta == META
    expected = load_file(str(path.with_suffix(".expected.safetensors")))
    assert set(decoded.tensors) == set(expected)
    for name, tensor in decoded.tensors.items():
        dense = tensor.to_dense() if isinstance(tensor, SparseTensor) else tensor
        assert torch.equal(dense, expected[name]), name
