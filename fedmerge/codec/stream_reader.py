"""Read a serialized DeltaPackage tensor by tensor from a buffer (e.g. a memory map), same bytes.

A package is one protobuf ``fedmerge.v1.DeltaPackage``; parsing it whole needs the whole byte string in
memory plus protobuf's copy of every payload. :class:`PackageReader` walks the top-level wire format
instead (tag, length; field 12 = one ``TensorDelta``), keeps the offsets of each tensor's bytes and
parses the small header fields alone, so a tensor is materialised only while it is checked or decoded:
memory is one tensor's encoded bytes plus what the caller keeps. The byte format is unchanged.

:func:`decode_task_vector_stream` applies the checks of
:func:`fedmerge.submission.decode_task_vector_package` in the same order (package size, header,
base, kind, every tensor header against the base, package checksum, then each tensor's checksum and
values) and returns the same :class:`~fedmerge.codec.package.DecodedPackage`.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping

import torch
from google.protobuf.message import DecodeError

from fedmerge.codec import checksum, container, validate
from fedmerge.codec.errors import ChecksumMismatch, MalformedPackage
from fedmerge.codec.package import DecodedPackage, _decode_tensor, _meta_of, check_format_version
from fedmerge.delta.rules import StaleOrInvalid, check_package_base
from fedmerge.delta.sparse import SparseTensor
from fedmerge.v1 import delta_pb2

TENSORS_FIELD = 12
FOLIO_MARGIN = 2 << 20  # the largest page-cache folio a fault maps (a huge page)
_TRUNCATED = (
    "bytes are not a fedmerge.v1.DeltaPackage (truncated or malformed wire format); was it truncated?"
)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedPackage(_TRUNCATED)
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start of the field incl. tag, end) of every top-level field."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MalformedPackage(_TRUNCATED)
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) and invalid wire types: not in fedmerge's schema
            raise MalformedPackage(_TRUNCATED)
        if pos > len(buf):
            raise MalformedPackage(_TRUNCATED)
        yield number, wire, start, pos


class PackageReader:
    """A package in ``buffer`` (bytes, memoryview or mmap), read tensor by tensor (module docstring)."""

    def __init__(self, buffer: bytes | memoryview | object, limits: validate.DecodeLimits) -> None:
        self.buf = memoryview(buffer)  # type: ignore[arg-type]
        self._map = buffer if isinstance(buffer, mmap.mmap) else None
        try:
            inside = container.opened(self.buf, limits)  # deflated: at most 16 MiB, read in memory
        except Exception:
            self.buf.release()  # the caller may close its memory map
            raise
        if inside is not None:
            self.buf.release()
            self.buf, self._map = memoryview(inside), None
        header = bytearray()
        self.spans: list[tuple[int, int]] = []  # the bytes of each TensorDelta (after tag and length)
        for number, wire, start, end in _fields(self.buf):
            if number == TENSORS_FIELD and wire == 2:
                _, body = _varint(self.buf, _varint(self.buf, start)[1])
                self.spans.append((body, end))
                self._drop(start, body)  # reading the tag mapped a folio of the file in
            else:
                header += self.buf[start:end]
        self.header = delta_pb2.DeltaPackage()
        try:
            self.header.ParseFromString(bytes(header))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise MalformedPackage(
                f"bytes are not a fedmerge.v1.DeltaPackage ({exc}); was it truncated?"
            ) from None
        check_format_version(self.header.format_version)
        self.meta = _meta_of(self.header)

    def tensor(self, index: int) -> delta_pb2.TensorDelta:
        """The ``index``-th TensorDelta, parsed from its bytes alone."""
        start, end = self.spans[index]
        td = delta_pb2.TensorDelta()
        try:
            td.ParseFromString(self.buf[start:end])  # type: ignore[arg-type]  # upb reads any buffer: no copy
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise MalformedPackage(f"tensor {index} is not a fedmerge.v1.TensorDelta ({exc})") from None
        self._drop(start, end)  # its pages are read: drop them from this process's memory
        return td

    def _drop(self, start: int, end: int) -> None:
        """Unmap the pages of ``buffer[start:end]`` from this process (a memory map only), with the
        margins a fault maps in beside them (the kernel maps whole large folios of the page cache)."""
        if self._map is None:
            return
        first = max(0, start - FOLIO_MARGIN)
        first -= first % mmap.PAGESIZE
        last = min(len(self.buf), end + FOLIO_MARGIN)
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def release(self) -> None:
        """Drop the view of the buffer (so a memory map can be closed)."""
        self.buf.release()


class StreamedPackage:
    """A task-vector package whose header, base and checksums are verified, decoded one tensor on demand.

    Built by :func:`open_task_vector_stream`; :meth:`decode` checks and decodes one tensor from the buffer
    (its checksum and values, as the whole-package decoder does). Call :meth:`release` when done.
    """

    def __init__(self, reader: PackageReader, headers: list[validate.TensorHeader], digest: bytes) -> None:
        self.reader = reader
        self.meta = reader.meta
        self.headers = headers
        self.digest = digest
        self.index = {h.name: i for i, h in enumerate(headers)}

    def decode(self, name: str) -> torch.Tensor | SparseTensor | None:
        """The tensor ``name`` as the package carries it (dense or sparse); None if it left it out."""
        i = self.index.get(name)
        if i is None:
            return None
        td = self.reader.tensor(i)
        if not td.checksum:  # folded: the bytes read again must be those the package checksum covered
            td.checksum = self.reader.header.tensors[i].checksum
        return _decode_tensor(td, self.headers[i])

    def release(self) -> None:
        self.reader.release()


def open_task_vector_stream(
    buffer: bytes | memoryview | object,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    base_id: str,
    base_hash: str,
    limits: validate.DecodeLimits = validate.DecodeLimits(),  # noqa: B008 (frozen)
) -> StreamedPackage:
    """The checks of :func:`fedmerge.submission.decode_task_vector_package` up to the package
    checksum (size, header, base, kind, every tensor header against the base), reading each tensor's
    bytes once; the tensors are decoded later, one at a time, by :meth:`StreamedPackage.decode`."""
    head_limits = limits.within_base(shapes)
    reader = PackageReader(buffer, head_limits)
    try:
        placeholders = [delta_pb2.TensorDelta() for _ in reader.spans]
        reader.header.tensors.extend(placeholders)
        validate.check_package_header(reader.header, head_limits)
        check_package_base(reader.meta.base_version_id, reader.meta.base_version_hash, base_id, base_hash)
        if reader.meta.kind != "task_vector":
            raise StaleOrInvalid(f"package kind {reader.meta.kind!r} where a task vector was expected")
        headers: list[validate.TensorHeader] = []
        total = 0
        for i in range(len(reader.spans)):
            td = reader.tensor(i)
            header = validate.check_tensor_header(td, head_limits, total, reader.header.format_version)
            total += header.numel
            headers.append(header)
            reader.header.tensors[i].checksum = checksum.carried_or_computed(td, reader.header.format_version)
        validate.check_expected(headers, shapes, allow_missing=True)
        digest = checksum.package_checksum(reader.header)
        if digest != reader.header.checksum:
            raise ChecksumMismatch(
                "package checksum does not match its header and tensor checksums; resend the package"
            )
    except BaseException:
        reader.release()
        raise
    return StreamedPackage(reader, headers, digest)


def decode_task_vector_stream(
    buffer: bytes | memoryview | object,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    base_id: str,
    base_hash: str,
    limits: validate.DecodeLimits = validate.DecodeLimits(),  # noqa: B008 (frozen)
) -> tuple[DecodedPackage, list[validate.TensorHeader]]:
    """:func:`fedmerge.submission.decode_task_vector_package` over a buffer read tensor by tensor;
    also returns the tensor headers (value and index encodings as declared)."""
    package = open_task_vector_stream(buffer, shapes, base_id=base_id, base_hash=base_hash, limits=limits)
    try:
        tensors = {h.name: package.decode(h.name) for h in package.headers}
        dtypes = {h.name: h.dtype for h in package.headers}
        decoded = DecodedPackage(package.meta, tensors, dtypes, package.digest)  # type: ignore[arg-type]
        return decoded, package.headers
    finally:
        package.release()
