"""Random and mutated bytes: the decoder may only return or raise a PackageError — never crash or hang."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge.codec import (
    CodecConfig,
    DecodeLimits,
    PackageError,
    PackageMeta,
    decode_package,
    encode_package,
)
from fedmerge.codec.checksum import package_checksum, tensor_checksum
from fedmerge.v1 import delta_pb2

_META = PackageMeta("fuzz", 1, "v1", "h")
_G = torch.Generator().manual_seed(0)
_DELTA = {"a.weight": torch.randn(20, 30, generator=_G) * 1e-3, "b.bias": torch.randn(17, generator=_G)}
_SEEDS = [
    encode_package(_DELTA, cfg, meta=_META).data
    for cfg in (
        CodecConfig(density=0.1, values="int8"),
        CodecConfig(sparsify="randomk", density=0.3, values="int4", block_size=8),
        CodecConfig(sparsify="none", values="bf16"),
        CodecConfig(density=0.5, values="fp16", index_coding="bitmap"),
        CodecConfig(density=0.05, values="fp32", index_coding="varint"),
        CodecConfig(density=0.2, values="int8", index_coding="coo"),
        CodecConfig(rank=3, density=0.3, values="int4", block_size=16),  # a factor pair (format 3)
        CodecConfig(rank=2, sparsify="none", values="fp32"),
    )
]
_DEFLATED = [  # the same kind of packages as one DEFLATE stream (fedmerge.codec.container)
    encode_package(_DELTA, cfg, meta=_META).data
    for cfg in (
        CodecConfig(density=0.2, values="int4", deflate=True),
        CodecConfig(rank=3, density=0.3, values="int4", deflate=True),  # a factor pair (format 3)
    )
]
_LIMITS = DecodeLimits(max_tensor_numel=1 << 20, max_total_numel=1 << 22)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(data: bytes) -> None:
    with contextlib.suppress(PackageError):
        decode_package(data, limits=_LIMITS)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _decode(data)


@FUZZ
@given(
    st.sampled_from(_SEEDS + _DEFLATED),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
)
def test_mutated_packages(seed: bytes, edits: list[tuple[int, int]]) -> None:
    data = bytearray(seed)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    _decode(bytes(data))


@FUZZ
@given(st.sampled_from(_SEEDS + _DEFLATED), st.integers(0, 1 << 16))
def test_truncated_packages(seed: bytes, cut: int) -> None:
    _decode(seed[: cut % len(seed)])


_INT = st.integers(0, (1 << 64) - 1)


@FUZZ
@given(
    st.sampled_from(_SEEDS),
    st.integers(0, 1),
    st.sampled_from(
        ["nnz", "block_size", "rice_k", "seed", "keep_threshold", "value_encoding", "index_encoding"]
    ),
    st.one_of(st.integers(0, 64), _INT),
    st.binary(max_size=64),
    st.sampled_from(["indices", "values", "block_scales", None]),
)
def test_resigned_header_and_payload_mutations(
    seed: bytes, which: int, field: str, value: int, blob: bytes, payload: str | None
) -> None:
    """Mutations with recomputed checksums reach the content checks behind them."""
    pkg = delta_pb2.DeltaPackage.FromString(seed)
    td = pkg.tensors[which]
    limit = (
        (1 << 32) - 1
        if field in ("block_size", "rice_k", "value_encoding", "index_encoding")
        else (1 << 64) - 1
    )
    try:
        setattr(
            td, field, min(value, limit) if field not in ("value_encoding", "index_encoding") else value % 8
        )
    except ValueError:
        return
    if payload is not None:
        setattr(td, payload, blob)
    td.checksum = tensor_checksum(td)
    pkg.checksum = package_checksum(pkg)
    _decode(pkg.SerializeToString())


@pytest.mark.parametrize("seed", range(len(_SEEDS) + len(_DEFLATED)))
def test_seed_packages_decode(seed: int) -> None:
    data = (_SEEDS + _DEFLATED)[seed]
    assert data[:1] == (b"\x00" if seed >= len(_SEEDS) else b"\x08")  # deflated; format_version's tag
    assert set(decode_package(data, limits=_LIMITS).tensors) == set(_DELTA)
