"""The safetensors byte layout, written and read one tensor at a time.

A safetensors file is ``u64-le N`` + ``N`` bytes of JSON header (padded with spaces to a multiple of
8) + the raw little-endian tensor bytes; the header maps each name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the start of the byte buffer
(https://github.com/huggingface/safetensors). Because the header only needs names, dtypes and
shapes, a file can be planned up front and its tensors streamed in one by one, so writing an
N-tensor file holds one tensor in memory, never the whole dict. Files written here load with
``safetensors.torch.load_file`` / ``safe_open``.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

_DTYPE_TO_NAME: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
_NAME_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in _DTYPE_TO_NAME.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsFormatError(ValueError):
    """Bytes that are not a well-formed safetensors file (callers re-raise with store context)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` → ``"F32"``)."""
    try:
        return _DTYPE_TO_NAME[dtype]
    except KeyError:
        raise SafetensorsFormatError(
            f"dtype {dtype} has no safetensors encoding; convert the tensor to one of "
            f"{sorted(str(d) for d in _DTYPE_TO_NAME)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` → ``torch.bfloat16``)."""
    try:
        return _NAME_TO_DTYPE[name]
    except KeyError:
        raise SafetensorsFormatError(f"unknown safetensors dtype {name!r}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor: everything a header needs before the bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, dtype=tensor.dtype, shape=tuple(tensor.shape))


def encode_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """``u64-le N`` + the JSON header for ``specs`` laid out back to back in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (contiguous CPU copy only when needed; no copy otherwise)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def encode_single(tensor: torch.Tensor, key: str = "tensor") -> tuple[bytes, memoryview]:
    """(header bytes, data bytes) of a one-tensor safetensors file holding ``tensor`` under ``key``."""
    return encode_header([spec_of(key, tensor)]), tensor_bytes(tensor)


@dataclass(frozen=True)
class Header:
    """A parsed header: where the byte buffer starts and each tensor's spec and offsets."""

    data_start: int
    entries: dict[str, tuple[TensorSpec, int, int]]
    metadata: dict[str, str]


def parse_header(buffer: bytes | mmap.mmap | memoryview, total_size: int) -> Header:
    """Parse and validate a header; offsets must tile the byte buffer exactly."""
    if total_size < 8:
        raise SafetensorsFormatError(f"file has {total_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(buffer[:8]))
    if n > MAX_HEADER_BYTES or 8 + n > total_size:
        raise SafetensorsFormatError(f"header length {n} does not fit in a {total_size}-byte file")
    try:
        raw = json.loads(bytes(buffer[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    entries: dict[str, tuple[TensorSpec, int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in raw.items():
        try:
            spec = TensorSpec(name, dtype_from_name(info["dtype"]), tuple(int(d) for d in info["shape"]))
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsFormatError(f"header entry {name!r} is malformed ({exc})") from None
        if end - begin != spec.nbytes:
            raise SafetensorsFormatError(
                f"tensor {name!r}: offsets span {end - begin} bytes but {spec.dtype}{list(spec.shape)} "
                f"needs {spec.nbytes}"
            )
        entries[name] = (spec, begin, end)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SafetensorsFormatError(f"tensor {name!r} starts at {begin}, expected {position}")
        position = end
    if 8 + n + position != total_size:
        raise SafetensorsFormatError(
            f"file has {total_size} bytes but its header describes {8 + n + position}"
        )
    return Header(data_start=8 + n, entries=entries, metadata=dict(metadata))


def tensor_from_buffer(buffer: mmap.mmap | bytearray, header: Header, name: str) -> torch.Tensor:
    """An owned copy of tensor ``name`` read out of ``buffer`` (the whole file's bytes or mmap)."""
    spec, begin, end = header.entries[name]
    if end == begin:
        return torch.empty(spec.shape, dtype=spec.dtype)
    view = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=header.data_start + begin)
    return view.view(spec.dtype).reshape(spec.shape).clone()


class StreamingWriter:
    """Write a safetensors file whose tensors arrive one at a time, in the planned order.

    ``plan`` fixes names, dtypes and shapes (and so the header); :meth:`write` checks each arriving
    tensor against it. Memory held: the tensor being written.
    """

    def __init__(self, stream: IO[bytes], plan: list[TensorSpec], metadata: dict[str, str] | None = None):
        self._stream = stream
        self._plan = plan
        self._next = 0
        stream.write(encode_header(plan, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise SafetensorsFormatError(f"tensor {name!r} arrived after the planned {len(self._plan)}")
        spec = self._plan[self._next]
        got = spec_of(name, tensor)
        if got != spec:
            raise SafetensorsFormatError(
                f"expected tensor {spec.name!r} {spec.dtype}{list(spec.shape)} next, got "
                f"{name!r} {got.dtype}{list(got.shape)}"
            )
        self._stream.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            missing = self._plan[self._next].name
            raise SafetensorsFormatError(
                f"stream ended after {self._next} of {len(self._plan)} tensors; {missing!r} never arrived"
            )


def write_streaming(
    stream: IO[bytes],
    plan: list[TensorSpec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``len(plan)`` tensors pulled from ``tensors`` into ``stream`` as one safetensors file."""
    writer = StreamingWriter(stream, plan, metadata)
    for _ in range(len(plan)):
        name, tensor = next(tensors)
        writer.write(name, tensor)
    writer.close()


def read_file_header(path: Path) -> Header:
    """Parse and validate only the header of the safetensors file at ``path`` (the data is not read)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{path} has {size} bytes, fewer than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsFormatError(f"{path}: header length {n} does not fit in a {size}-byte file")
        # parse_header indexes only the first 8 + n bytes, so the prefix stands in for the whole file.
        return parse_header(head + fh.read(n), size)
