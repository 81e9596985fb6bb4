"""Deflated packages (``fedmerge.codec.container``): the same package inside, smaller, read by every
decoder, and judged before anything is trusted — bombs, truncation, trailing bytes, tampering."""

from __future__ import annotations

import mmap
import random
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedmerge.codec import container
from fedmerge.codec.config import CodecConfig
from fedmerge.codec.errors import ChecksumMismatch, DeclaredSizeTooLarge, MalformedPackage
from fedmerge.codec.package import PackageMeta, decode_package, encode_package
from fedmerge.codec.stream_reader import decode_task_vector_stream
from fedmerge.codec.validate import DecodeLimits
from fedmerge.delta.sparse import SparseTensor

META = PackageMeta(client_id="client-3", round=4, base_version_id="v000005", base_version_hash="ab" * 32)
SHAPES = {"fc1.weight": (128, 64), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)}


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.01 * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def _dense(t: torch.Tensor | SparseTensor) -> torch.Tensor:
    return t.to_dense(torch.float32) if isinstance(t, SparseTensor) else t


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return container.MAGIC + packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(density=0.2, values="int4"),
        CodecConfig(density=0.2, values="int4", rank=8),
        CodecConfig(density=0.2, values="sign"),
    ],
    ids=["top20-int4", "rank8-int4", "top20-sign"],
)
def test_a_deflated_package_is_the_same_package_smaller(config: CodecConfig) -> None:
    plain = encode_package(_delta(), config, meta=META)
    packed = encode_package(_delta(), replace(config, deflate=True), meta=META)
    assert container.is_deflated(packed.data) and not container.is_deflated(plain.data)
    assert len(packed.data) < len(plain.data) and packed.report.total_bytes == len(packed.data)
    # inside: exactly the bytes the plain encoder wrote (Python's own zlib inflates it)
    assert zlib.decompress(packed.data[len(container.MAGIC) :], -15) == plain.data
    assert packed.residual.keys() == plain.residual.keys()
    for name in plain.residual:
        assert torch.equal(packed.residual[name], plain.residual[name])
    a, b = decode_package(plain.data), decode_package(packed.data, expected_shapes=SHAPES)
    assert a.checksum == b.checksum and a.meta == b.meta
    for name in a.tensors:
        assert torch.equal(_dense(a.tensors[name]), _dense(b.tensors[name]))


def test_deflate_keeps_bytes_that_would_not_shrink() -> None:
    noise = random.Random(1).randbytes(500)
    assert container.deflated(noise) == noise and container.deflated(b"") == b""
    big = b"\x0a" * (container.MAX_INFLATED_BYTES + 1)  # above the bound: never deflated
    assert container.deflated(big) is big


def test_the_stream_reader_reads_a_deflated_package_from_a_memory_map(tmp_path: Path) -> None:
    packed = encode_package(_delta(), CodecConfig(density=0.2, values="int4", deflate=True), meta=META)
    path = tmp_path / "package.bin"
    path.write_bytes(packed.data)
    kwargs = {"base_id": META.base_version_id, "base_hash": META.base_version_hash}
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        streamed, _ = decode_task_vector_stream(mm, SHAPES, **kwargs)  # closing the map must work after
    whole = decode_package(packed.data)
    assert streamed.checksum == whole.checksum
    for name in whole.tensors:
        assert torch.equal(_dense(streamed.tensors[name]), _dense(whole.tensors[name]))


def test_a_bomb_is_refused_without_inflating_past_the_bound() -> None:
    bomb = _raw_deflate(b"\x0a" * (container.MAX_INFLATED_BYTES + 1))
    assert len(bomb) < 40_000
    with pytest.raises(DeclaredSizeTooLarge, match="inflates past"):
        decode_package(bomb)
    # the decoder's own bound, tightened by the base's shapes, applies first
    small = _raw_deflate(b"\x0a" * 1_000_000)
    with pytest.raises(DeclaredSizeTooLarge, match="inflates past"):
        decode_package(small, expected_shapes=SHAPES)
    with pytest.raises(DeclaredSizeTooLarge):
        container.inflated(small, 1000)


def test_damaged_streams_are_malformed_and_a_tampered_inside_fails_its_checksum() -> None:
    plain = encode_package(_delta(), CodecConfig(density=0.2, values="int4"), meta=META).data
    packed = _raw_deflate(plain)
    with pytest.raises(MalformedPackage, match="truncated"):
        decode_package(packed[: len(packed) // 2])
    with pytest.raises(MalformedPackage, match="after its DEFLATE stream"):
        decode_package(packed + b"\x00\x01extra")
    with pytest.raises(MalformedPackage, match="does not inflate"):
        decode_package(container.MAGIC + b"\xff" * 64)
    tampered = bytearray(plain)
    tampered[-40] ^= 0x10  # inside the last tensor's payload or the package checksum
    with pytest.raises((ChecksumMismatch, MalformedPackage)):
        decode_package(_raw_deflate(bytes(tampered)))


def test_limits_apply_to_the_deflated_and_the_inflated_size() -> None:
    packed = encode_package(_delta(), CodecConfig(density=0.2, values="int4", deflate=True), meta=META).data
    inside = len(container.inflated(packed, 1 << 20))
    decode_package(packed, limits=DecodeLimits(max_package_bytes=inside))
    with pytest.raises(DeclaredSizeTooLarge):
        decode_package(packed, limits=DecodeLimits(max_package_bytes=inside - 1))
    with pytest.raises(DeclaredSizeTooLarge):
        decode_package(packed, limits=DecodeLimits(max_package_bytes=len(packed) - 1))


def test_deflate_must_be_a_bool() -> None:
    with pytest.raises(Exception, match="deflate must be true or false"):
        CodecConfig(deflate="yes")  # type: ignore[arg-type]
