"""Decoding refuses every inconsistency with a specific InvalidSubmission subclass naming the tensor."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

import fedmerge
from fedmerge.codec import (
    ChecksumMismatch,
    CodecConfig,
    DeclaredSizeTooLarge,
    DecodeLimits,
    InvalidIndices,
    MalformedPackage,
    NonFiniteValues,
    PackageMeta,
    PayloadSizeMismatch,
    TensorNameMismatch,
    TensorShapeMismatch,
    UnsupportedDtype,
    UnsupportedFormatVersion,
    decode_package,
    encode_package,
)
from fedmerge.codec.checksum import FOLDED_MAX_PAYLOAD_BYTES, package_checksum, tensor_checksum
from fedmerge.errors import InvalidSubmission
from fedmerge.v1 import delta_pb2

Resign = Callable[[delta_pb2.DeltaPackage], bytes]


def _package(delta: dict[str, torch.Tensor], meta: PackageMeta, **cfg: object) -> delta_pb2.DeltaPackage:
    data = encode_package(delta, CodecConfig(**cfg), meta=meta).data  # type: ignore[arg-type]
    return delta_pb2.DeltaPackage.FromString(data)


def test_a_tiny_package_claiming_100_gb_is_refused_before_allocation() -> None:
    td = delta_pb2.TensorDelta(name="w", shape=[25_000_000_000], dtype="float32", nnz=25_000_000_000)
    td.value_encoding = delta_pb2.VALUE_ENCODING_FP32
    td.index_encoding = delta_pb2.INDEX_ENCODING_DENSE
    pkg = delta_pb2.DeltaPackage(
        format_version=fedmerge.FORMAT_VERSION, kind=delta_pb2.DELTA_KIND_TASK_VECTOR
    )
    pkg.tensors.append(td)
    data = pkg.SerializeToString()
    assert len(data) < 100
    start = time.perf_counter()
    with pytest.raises(DeclaredSizeTooLarge, match=r"'w'.*25000000000.*max_tensor_numel"):
        decode_package(data)
    assert time.perf_counter() - start < 5  # generous; it takes microseconds (see bench)


def test_limits_are_configurable(delta: dict[str, torch.Tensor], meta: PackageMeta) -> None:
    data = encode_package(delta, CodecConfig(), meta=meta).data
    with pytest.raises(DeclaredSizeTooLarge, match="max_tensor_numel"):
        decode_package(data, limits=DecodeLimits(max_tensor_numel=100))
    with pytest.raises(DeclaredSizeTooLarge, match="max_package_bytes"):
        decode_package(data, limits=DecodeLimits(max_package_bytes=10))
    with pytest.raises(DeclaredSizeTooLarge, match="max_tensors"):
        decode_package(data, limits=DecodeLimits(max_tensors=2))


def test_garbage_and_version(delta: dict[str, torch.Tensor], meta: PackageMeta, resigner: Resign) -> None:
    with pytest.raises(MalformedPackage):
        decode_package(b"\xff\xff\xff\xff")
    pkg = _package(delta, meta)
    pkg.format_version = 99
    with pytest.raises(UnsupportedFormatVersion, match="99"):
        decode_package(resigner(pkg))


@pytest.mark.parametrize("index", range(4))
def test_flipped_payload_bit_fails_the_checksum(
    index: int, delta: dict[str, torch.Tensor], meta: PackageMeta
) -> None:
    """A tensor that carries its checksum is named; a folded one fails the package checksum."""
    pkg = _package(delta, meta, sparsify="none", values="fp32")
    td = pkg.tensors[index]
    folded = not td.checksum
    assert folded == (len(td.values) <= FOLDED_MAX_PAYLOAD_BYTES)
    values = bytearray(td.values)
    values[0] ^= 1
    td.values = bytes(values)
    with pytest.raises(ChecksumMismatch, match="package checksum" if folded else repr(td.name)):
        decode_package(pkg.SerializeToString())


def test_small_tensors_leave_their_checksum_to_the_package(
    delta: dict[str, torch.Tensor], meta: PackageMeta
) -> None:
    cfg = CodecConfig(sparsify="none", values="fp32")
    pkg = _package(delta, meta, sparsify="none", values="fp32")
    assert pkg.format_version == 2
    carried = {td.name for td in pkg.tensors if td.checksum}
    assert carried == {"layers.0.attn.weight", "layers.1.mlp.weight"}  # 12 288 and 24 576 value bytes
    decoded = decode_package(pkg.SerializeToString())
    assert torch.equal(decoded.tensors["norm.weight"], delta["norm.weight"])  # type: ignore[arg-type]
    unfolded = _package(delta, meta, sparsify="none", values="fp32")
    for td in unfolded.tensors:
        td.checksum = tensor_checksum(td)
    saved = len(unfolded.SerializeToString()) - len(encode_package(delta, cfg, meta=meta).data)
    assert saved == 2 * (2 + 32)  # tag, length and digest of the two folded tensors


def test_only_small_tensors_of_format_2_may_fold(delta: dict[str, torch.Tensor], meta: PackageMeta) -> None:
    pkg = _package(delta, meta, sparsify="none", values="fp32")
    big = next(td for td in pkg.tensors if td.name == "layers.1.mlp.weight")
    big.ClearField("checksum")
    with pytest.raises(MalformedPackage, match=r"'layers.1.mlp.weight'.*checksum is missing"):
        decode_package(pkg.SerializeToString())
    old = _package(delta, meta)
    old.format_version = 1  # format 1 carried every tensor checksum
    with pytest.raises(MalformedPackage, match=r"checksum is missing \(format 1\)"):
        decode_package(old.SerializeToString())
    for td in old.tensors:
        td.checksum = tensor_checksum(td)
    old.checksum = package_checksum(old)
    assert set(decode_package(old.SerializeToString()).tensors) == set(delta)  # format 1 still reads


def test_changed_header_fails_the_package_checksum(delta: dict[str, torch.Tensor], meta: PackageMeta) -> None:
    pkg = _package(delta, meta)
    pkg.num_examples = 10_000
    with pytest.raises(ChecksumMismatch, match="package checksum"):
        decode_package(pkg.SerializeToString())


def test_names_and_shapes_against_the_base(delta: dict[str, torch.Tensor], meta: PackageMeta) -> None:
    data = encode_package(delta, CodecConfig(), meta=meta).data
    shapes = {k: tuple(v.shape) for k, v in delta.items()}
    with pytest.raises(TensorShapeMismatch, match=r"'norm.weight'.*\(8,\)"):
        decode_package(data, expected_shapes={**shapes, "norm.weight": (8,)})
    with pytest.raises(TensorNameMismatch, match=r"'extra.weight'.*missing"):
        decode_package(data, expected_shapes={**shapes, "extra.weight": (2,)})
    del shapes["norm.weight"]
    with pytest.raises(TensorNameMismatch, match=r"'norm.weight'.*not a tensor of the base"):
        decode_package(data, expected_shapes=shapes)


def _mutate(pkg: delta_pb2.DeltaPackage, field: str, value: object) -> delta_pb2.DeltaPackage:
    td = pkg.tensors[0]
    setattr(td, field, value(td) if callable(value) else value)
    return pkg


@pytest.mark.parametrize(
    "cfg,field,value,error,match",
    [
        ({}, "dtype", "int64", UnsupportedDtype, "int64"),
        ({}, "nnz", 10**6, MalformedPackage, "nnz"),
        ({}, "block_size", 0, MalformedPackage, "block_size"),
        ({}, "value_encoding", 42, MalformedPackage, "value_encoding"),
        ({}, "values", b"\x01\x02", PayloadSizeMismatch, "value payload"),
        ({}, "block_scales", b"", PayloadSizeMismatch, "block-scale"),
        ({"index_coding": "coo"}, "indices", b"\x00" * 3, PayloadSizeMismatch, "index payload"),
        ({"sparsify": "randomk"}, "seed", 7, InvalidIndices, "seed 7"),
        (
            {"sparsify": "none", "values": "fp32"},
            "values",
            lambda td: b"\x00\x00\xc0\x7f" * (len(td.values) // 4),
            NonFiniteValues,
            "nan",
        ),
        (
            {},
            "block_scales",
            lambda td: b"\x00\x00\x80\x7f" * (len(td.block_scales) // 4),
            NonFiniteValues,
            "block scale",
        ),
        *(
            (  # a negative scale would flip every value of its block: outside the declared precision
                {"values": values},
                "block_scales",
                lambda td: b"\x00\x00\x80\xbf" * (len(td.block_scales) // 4),
                MalformedPackage,
                "block scale 0 is negative",
            )
            for values in ("int8", "sign")
        ),
        (
            {"index_coding": "coo"},
            "indices",
            lambda td: b"\x05\x00\x00\x00" * (len(td.indices) // 4),
            InvalidIndices,
            "strictly increasing",
        ),
    ],
)
def test_resigned_tampering_is_still_refused(
    cfg: dict[str, object],
    field: str,
    value: object,
    error: type[InvalidSubmission],
    match: str,
    delta: dict[str, torch.Tensor],
    meta: PackageMeta,
    resigner: Resign,
) -> None:
    """Checksums catch accidents; a sender who recomputes them still meets every content check."""
    pkg = _mutate(_package(delta, meta, **cfg), field, value)
    with pytest.raises(error, match=match) as info:
        decode_package(resigner(pkg))
    assert isinstance(info.value, InvalidSubmission)
    assert pkg.tensors[0].name in str(info.value)


def test_duplicate_tensor_names(delta: dict[str, torch.Tensor], meta: PackageMeta, resigner: Resign) -> None:
    pkg = _package(delta, meta)
    pkg.tensors.append(pkg.tensors[0])
    with pytest.raises(TensorNameMismatch, match="twice"):
        decode_package(resigner(pkg))


def test_checksums_cover_every_header_field() -> None:
    td = delta_pb2.TensorDelta(name="w", shape=[2, 3], dtype="float32", nnz=6)
    base = tensor_checksum(td)
    changes: list[tuple[str, object]] = [("name", "v"), ("shape", [3, 2]), ("dtype", "float16"), ("nnz", 5)]
    changes += [("block_size", 2), ("rice_k", 1), ("seed", 1), ("keep_threshold", 1), ("values", b"x")]
    changes += [("rank", 1)]
    for field, value in changes:
        other = delta_pb2.TensorDelta()
        other.CopyFrom(td)
        if field == "shape":
            del other.shape[:]
            other.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(other, field, value)
        assert tensor_checksum(other) != base, field
    pkg = delta_pb2.DeltaPackage(client_id="a")
    assert package_checksum(pkg) != package_checksum(delta_pb2.DeltaPackage(client_id="b"))
