"""The tensor-by-tensor package reader (``fedmerge.codec.stream_reader``) decides exactly as the whole
package decoder: same tensors for a valid package, the same error class for damaged ones, also when it
reads from a memory map."""

from __future__ import annotations

import mmap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedmerge.codec.stream_reader import decode_task_vector_stream
from fedmerge.delta.sparse import SparseTensor
from fedmerge.submission import decode_task_vector_package
from fedmerge_testing.hostile import FlowerRound


@pytest.fixture
def fr(tmp_path: Path) -> FlowerRound:
    return FlowerRound.open(tmp_path / "store")


def _dense(t: object) -> torch.Tensor:
    return t.to_dense(torch.float32) if isinstance(t, SparseTensor) else t  # type: ignore[return-value]


def _both(fr: FlowerRound, data: bytes) -> tuple[object, object]:
    state = fr.state()
    kwargs = {"base_id": fr.base.id, "base_hash": fr.base.content_hash, "limits": state.limits}
    out: list[object] = []
    for decode in (
        lambda: decode_task_vector_package(data, state.shapes, **kwargs),
        lambda: decode_task_vector_stream(data, state.shapes, **kwargs)[0],
    ):
        try:
            out.append(decode())
        except Exception as exc:  # the class is what is compared
            out.append(type(exc))
    return out[0], out[1]


def test_valid_package_decodes_to_the_same_tensors_from_a_memory_map(fr: FlowerRound, tmp_path: Path) -> None:
    data = fr.valid(0).data
    path = tmp_path / "package.bin"
    path.write_bytes(data)
    state = fr.state()
    kwargs = {"base_id": fr.base.id, "base_hash": fr.base.content_hash, "limits": state.limits}
    whole = decode_task_vector_package(data, state.shapes, **kwargs)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        streamed, headers = decode_task_vector_stream(mm, state.shapes, **kwargs)
    assert streamed.meta == whole.meta and streamed.checksum == whole.checksum
    assert streamed.tensors.keys() == whole.tensors.keys() and len(headers) == len(whole.tensors)
    for name in whole.tensors:
        assert torch.equal(_dense(streamed.tensors[name]), _dense(whole.tensors[name]))


@pytest.mark.parametrize("cut", [1, 7, 100, 1000])
def test_truncated_packages_are_refused_like_the_whole_decoder(fr: FlowerRound, cut: int) -> None:
    data = fr.valid(0).data
    whole, streamed = _both(fr, data[:-cut])
    assert isinstance(whole, type) and streamed is whole


@pytest.mark.parametrize("where", [0.25, 0.5, 0.9])
def test_flipped_bytes_are_refused_like_the_whole_decoder(fr: FlowerRound, where: float) -> None:
    data = bytearray(fr.valid(0).data)
    data[int(len(data) * where)] ^= 0x55
    whole, streamed = _both(fr, bytes(data))
    if isinstance(whole, type):
        assert streamed is whole
    else:  # a flip in a byte no check covers: both accept the same content
        assert not isinstance(streamed, type)


def test_stale_base_is_refused_like_the_whole_decoder(fr: FlowerRound) -> None:
    valid = fr.valid(0)
    data = valid.encode(meta=replace(valid.meta, base_version_hash="f" * 64))
    whole, streamed = _both(fr, data)
    assert isinstance(whole, type) and streamed is whole
