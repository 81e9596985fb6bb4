"""Content-addressed blob storage: each blob is named by the sha256 of its bytes.

A blob holds one tensor as a one-tensor safetensors file (key ``"tensor"``), so identical tensors
are stored once whatever parameter name they carry. :class:`BlobBackend` is the small interface
the store needs; :class:`LocalBlobBackend` implements it on a directory:

    <root>/blobs/<first 2 hex>/<64 hex>.safetensors     a committed blob
    <root>/tmp/<random>.partial                         a blob being written (never referenced)

Writes are crash-safe: bytes go to a temporary file, which is fsynced, then renamed onto its final
name (atomic on POSIX); :meth:`BlobBackend.sync` fsyncs the directories so the renames survive a
power loss. A reader therefore sees a blob whole or not at all. A commit writes its blobs in two
phases so that the fsyncs are batched: :meth:`LocalBlobBackend.stage` writes a temporary file while
hashing the same chunks (one pass over the bytes, no fsync), then :meth:`LocalBlobBackend.publish`
fsyncs every staged file (concurrently: the fsyncs share journal commits) and only then renames each
onto its final name. The order per blob is unchanged — bytes durable before the rename, renames
durable (directory fsync) before the manifest — so the durability promise is the same as one
fsync per blob. An object-store backend would
implement the same protocol (``local_path`` then being a read-through cache).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import re
import secrets
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BufferedReader, BytesIO, FileIO
from pathlib import Path
from typing import Protocol, cast

import torch

from fedmerge.fsutil import fsync_dir
from fedmerge.store.errors import CorruptBlobError, MissingBlobError
from fedmerge.store.safetensors_format import (
    MAX_HEADER_BYTES,
    Header,
    SafetensorsFormatError,
    TensorSpec,
    encode_single,
    parse_header,
    tensor_from_buffer,
)

BLOB_KEY = "tensor"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
Buffer = bytes | memoryview
BlobReader = FileIO | BufferedReader | BytesIO
"""What :meth:`BlobBackend.open_read` returns: a local file, a buffered reader over ranged GETs, or
the bytes of a small blob fetched whole."""


class BlobBackend(Protocol):
    """Where blobs live. Digests are lowercase sha256 hex strings of the blob's bytes."""

    def has(self, digest: str) -> bool:
        """Whether a complete blob named ``digest`` exists."""
        ...

    def put(self, digest: str, parts: Sequence[Buffer]) -> bool:
        """Store the concatenation of ``parts`` under ``digest`` atomically; False if it already existed.

        The caller guarantees ``digest`` is the sha256 of the bytes. An existing blob is kept (and its
        age reset, so a grace-period ``gc`` does not remove it under a commit that is reusing it).
        """
        ...

    def local_path(self, digest: str) -> Path:
        """Where the blob's bytes sit on this machine (for an object store: its cache entry)."""
        ...

    @property
    def read_threads(self) -> int | None:
        """Threads worth reading blobs in parallel (None: one per CPU, reads being CPU-bound)."""
        ...

    def open_read(self, digest: str, what: str) -> tuple[BlobReader, int]:
        """(seekable unbuffered reader, size) of the blob; :class:`MissingBlobError` if it is absent.

        The reader hands out the stored bytes unchecked: callers hash what they use."""
        ...

    def size(self, digest: str) -> int: ...

    def mtime(self, digest: str) -> float:
        """Seconds since the epoch when the blob was last written or reused."""
        ...

    def delete(self, digest: str) -> None: ...

    def digests(self) -> Iterator[str]:
        """Every stored digest (order unspecified)."""
        ...

    def sync(self) -> None:
        """Make every completed :meth:`put` durable (directory entries included)."""
        ...

    @property
    def tmp_dir(self) -> Path:
        """A local directory for temporary files (same file system as the store's manifests)."""
        ...

    def stage(self, parts: Sequence[Buffer]) -> StagedBlob:
        """Write a blob while hashing it; visible and durable after :meth:`publish` and :meth:`sync`."""
        ...

    def publish(self, staged: Sequence[StagedBlob]) -> None: ...

    def hash_blob(self, digest: str) -> tuple[str, int]:
        """(sha256 hex of the stored bytes, their size), read from the backend itself."""
        ...

    def describe(self, digest: str) -> str:
        """Where the blob lives, for messages (a path or a URL)."""
        ...

    def stray_paths(self) -> Sequence[Path | str]:
        """Entries among the blobs that the store did not write."""
        ...

    def leftover_tmp(self, older_than: float | None = None) -> list[Path]: ...

    def put_manifest(self, name: str, data: bytes) -> None:
        """Keep a copy of a manifest with the blobs (a no-op where the manifests are already there)."""
        ...

    def get_manifest(self, name: str) -> bytes | None:
        """The copy kept by :meth:`put_manifest`, or None."""
        ...


_CHUNK = 1 << 20  # hash and write in 1 MiB chunks: each chunk is still in cache when it is written


@dataclass(frozen=True)
class StagedBlob:
    """A blob written to ``tmp`` (not yet durable nor visible) whose bytes hash to ``digest``;
    ``tmp`` is None when a blob with that digest already existed (its age was reset instead)."""

    digest: str
    tmp: Path | None
    final: Path


def fsync_path(path: Path) -> None:
    """fsync a file's data and metadata by path (the same open-read-only-and-fsync as a directory's)."""
    fsync_dir(path)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` to disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere or if it fails).

    This is a hint, not a durability step: the caller still fsyncs. Issued while later bytes are
    being written, it lets the disk work during the writing, so the closing fsync only waits for
    the last chunks instead of the whole file.
    """
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_WRITEBACK = 8 << 20  # written bytes handed to the disk (start_writeback) in runs of this size


def _write_parts(fd: int, parts: Sequence[Buffer], hasher: hashlib._Hash | None) -> None:
    """Write ``parts`` to ``fd`` in :data:`_CHUNK` chunks, feeding each to ``hasher`` first; the disk
    writeback of every :data:`_WRITEBACK` bytes is started as they are written (the caller fsyncs)."""
    offset = flushed = 0
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, view.nbytes, _CHUNK):
            chunk = view[start : start + _CHUNK]
            if hasher is not None:
                hasher.update(chunk)
            while chunk.nbytes:
                written = os.write(fd, chunk)
                chunk = chunk[written:]
                offset += written
            if offset - flushed >= _WRITEBACK:
                start_writeback(fd, flushed, offset - flushed)
                flushed = offset
    start_writeback(fd, flushed, offset - flushed)


def write_atomic(final: Path, parts: Sequence[Buffer], tmp_dir: Path) -> None:
    """Write ``parts`` to a temporary file in ``tmp_dir``, fsync it, rename it onto ``final``."""
    tmp = tmp_dir / f"{secrets.token_hex(8)}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_parts(fd, parts, None)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)


class LocalBlobBackend:
    """:class:`BlobBackend` on a local directory (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self._tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._dirty: set[Path] = set()

    @property
    def tmp_dir(self) -> Path:
        return self._tmp_dir

    @property
    def read_threads(self) -> int | None:
        return None

    def describe(self, digest: str) -> str:
        return str(self.local_path(digest))

    def hash_blob(self, digest: str) -> tuple[str, int]:
        path = self.local_path(digest)
        return hash_file(path), path.stat().st_size

    def put_manifest(self, name: str, data: bytes) -> None:
        """Nothing to do: the manifests are in the same directory."""

    def get_manifest(self, name: str) -> bytes | None:
        return None

    def local_path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise MissingBlobError(f"{digest!r} is not a sha256 hex digest; the manifest is damaged")
        return self.blob_dir / digest[:2] / f"{digest}.safetensors"

    def has(self, digest: str) -> bool:
        return self.local_path(digest).is_file()

    def open_read(self, digest: str, what: str) -> tuple[BlobReader, int]:
        path = self.local_path(digest)
        try:
            fh = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise MissingBlobError(
                f"{what}: blob {digest} is missing from {path.parent.parent}; restore it from a backup or "
                "an export — the store never deletes referenced blobs, so something outside it did"
            ) from None
        return fh, os.fstat(fh.fileno()).st_size

    def put(self, digest: str, parts: Sequence[Buffer]) -> bool:
        final = self.local_path(digest)
        if final.is_file():
            os.utime(final)
            return False
        final.parent.mkdir(exist_ok=True)
        write_atomic(final, parts, self.tmp_dir)
        self._dirty.add(final.parent)
        return True

    def stage(self, parts: Sequence[Buffer]) -> StagedBlob:
        """Write ``parts`` to a temporary file, hashing them on the way (no fsync, not yet visible).

        If a blob with the same digest exists already, the temporary file is removed and the
        existing blob's age reset (as :meth:`put` does). Safe to call from several threads.
        """
        tmp = self.tmp_dir / f"{secrets.token_hex(8)}.partial"
        hasher = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_parts(fd, parts, hasher)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        digest = hasher.hexdigest()
        final = self.local_path(digest)
        if final.is_file():
            tmp.unlink()
            os.utime(final)
            return StagedBlob(digest, None, final)
        return StagedBlob(digest, tmp, final)

    def publish(self, staged: Sequence[StagedBlob]) -> None:
        """fsync every staged temporary file (concurrently), then rename each onto its final name.

        Call :meth:`sync` afterwards to make the renames durable. On an error the staged files that
        were not renamed are removed and the error propagates.
        """
        todo = [s for s in staged if s.tmp is not None]
        try:
            paths = [s.tmp for s in todo if s.tmp is not None]
            if len(paths) > 1:
                with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
                    list(pool.map(fsync_path, paths))
            elif paths:
                fsync_path(paths[0])
            for s in todo:
                assert s.tmp is not None
                s.final.parent.mkdir(exist_ok=True)
                os.replace(s.tmp, s.final)  # a duplicate digest in the batch replaces equal bytes
                self._dirty.add(s.final.parent)
        except BaseException:
            for s in todo:
                if s.tmp is not None:
                    s.tmp.unlink(missing_ok=True)
            raise

    def size(self, digest: str) -> int:
        return self.local_path(digest).stat().st_size

    def mtime(self, digest: str) -> float:
        return self.local_path(digest).stat().st_mtime

    def delete(self, digest: str) -> None:
        path = self.local_path(digest)
        path.unlink()
        self._dirty.add(path.parent)

    def digests(self) -> Iterator[str]:
        for sub in sorted(self.blob_dir.iterdir()):
            if not sub.is_dir():
                continue
            for path in sorted(sub.iterdir()):
                name = path.name.removesuffix(".safetensors")
                if _DIGEST.match(name) and name[:2] == sub.name and path.suffix == ".safetensors":
                    yield name

    def sync(self) -> None:
        """fsync, concurrently in one batch, every blob subdirectory whose entries changed and
        ``blobs/`` itself (whose entries are the subdirectories, possibly created by another process
        that has not synced yet): no fsync waits for another."""
        dirty = sorted(self._dirty | {self.blob_dir}) if self._dirty else []
        if len(dirty) > 1:  # concurrent fsyncs share journal commits: ~3× faster than one after another
            with ThreadPoolExecutor(max_workers=min(8, len(dirty))) as pool:
                list(pool.map(fsync_dir, dirty))
        elif dirty:
            fsync_dir(dirty[0])
        self._dirty.clear()

    def stray_paths(self) -> list[Path]:
        """Files under ``blobs/`` whose name is not ``<aa>/<sha256>.safetensors`` (never written by us)."""
        stray: list[Path] = []
        for path in sorted(self.blob_dir.rglob("*")):
            rel = path.relative_to(self.blob_dir).parts
            if path.is_dir() and len(rel) == 1 and re.fullmatch(r"[0-9a-f]{2}", rel[0]):
                continue
            name = path.name.removesuffix(".safetensors")
            ok = (
                len(rel) == 2
                and path.is_file()
                and path.suffix == ".safetensors"
                and bool(_DIGEST.match(name))
                and name[:2] == rel[0]
            )
            if not ok:
                stray.append(path)
        return stray

    def leftover_tmp(self, older_than: float | None = None) -> list[Path]:
        """Temporary files of interrupted writes (optionally only those older than ``older_than`` s)."""
        now = time.time()
        out = []
        for path in sorted(self.tmp_dir.iterdir()):
            if older_than is None or now - path.stat().st_mtime >= older_than:
                out.append(path)
        return out


def encode_blob(tensor: torch.Tensor) -> tuple[str, list[Buffer]]:
    """(sha256 hex, byte parts) of the one-tensor safetensors blob holding ``tensor``."""
    header, data = encode_single(tensor, BLOB_KEY)
    h = hashlib.sha256(header)
    h.update(data)
    return h.hexdigest(), [header, data]


def hash_file(path: Path) -> str:
    """sha256 hex of a file's bytes, read in chunks (constant memory)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_blob(backend: BlobBackend, digest: str, *, what: str, check_hash: bool = True) -> torch.Tensor:
    """The tensor stored in blob ``digest``, read and (by default) re-hashed before use.

    The bytes are read straight into the returned tensor's memory in 1 MiB chunks, each hashed
    while it is in cache (one copy from the page cache, no page-fault-per-page mmap, no clone).
    A blob whose header is unreadable is re-examined whole, so a corrupted blob is reported as
    such (hash mismatch) before any format error. ``what`` names the referencing version and tensor
    in error messages. Raises :class:`MissingBlobError` or :class:`CorruptBlobError`; nothing is
    repaired.
    """
    fh, size = backend.open_read(digest, what)
    with fh:
        if size == 0:
            raise CorruptBlobError(f"{what}: blob {digest} is empty; restore it from a backup")
        found = _blob_header(fh, size)
        if found is None:
            return _read_blob_whole(fh, size, digest, what, check_hash)
        head, header = found
        spec, begin, end = header.entries[BLOB_KEY]
        out = torch.empty(spec.shape, dtype=spec.dtype)
        hasher = hashlib.sha256(head) if check_hash else None
        if end > begin:
            view = out.view(-1).view(torch.uint8).numpy().data.cast("B")
            fh.seek(header.data_start + begin)
            for start in range(0, view.nbytes, _CHUNK):
                chunk = view[start : start + _CHUNK]
                got = 0
                while got < chunk.nbytes:
                    n = fh.readinto(chunk[got:])
                    if not n:
                        raise CorruptBlobError(f"{what}: blob {digest} ended early; restore it from a backup")
                    got += n
                if hasher is not None:
                    hasher.update(chunk)
        if hasher is not None and hasher.hexdigest() != digest:
            raise CorruptBlobError(
                f"{what}: blob {digest} is corrupted (its bytes hash to {hasher.hexdigest()}); "
                "restore it from a backup — the store does not repair it"
            )
        return out


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """``os.pwrite`` all of ``data`` at ``offset`` (repeating on short writes)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class BlobStream:
    """Sequential reader of one blob's tensor bytes that hashes every byte it hands out.

    Open one with :func:`open_blob_stream`. :meth:`readinto` fills a caller's buffer with the next
    bytes of the tensor and feeds exactly those bytes to SHA-256 (the header was hashed on opening),
    so what is hashed is what the caller uses; :meth:`verify` then checks that every byte was read
    and that sha256(header ‖ data) equals the blob's name. Bytes handed out before :meth:`verify` are
    not yet trusted: a caller that writes them somewhere must discard that output when it raises.
    Not thread-safe; use one stream per thread (streams on different blobs run in parallel: hashlib
    and the file reads release the GIL).
    """

    def __init__(
        self, fh: BlobReader, digest: str, what: str, spec: TensorSpec, head: bytes, start: int
    ) -> None:
        self._fh = fh
        self.digest = digest
        self.what = what
        self.spec = spec
        self.remaining = spec.nbytes
        self._hasher = hashlib.sha256(head)
        fh.seek(start)

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` (at most :attr:`remaining` bytes) with the blob's next tensor bytes, hashing them."""
        if view.nbytes > self.remaining:
            raise ValueError(f"{self.what}: asked for {view.nbytes} bytes, {self.remaining} remain")
        got = 0
        while got < view.nbytes:
            n = self._fh.readinto(view[got:])
            if not n:
                raise CorruptBlobError(
                    f"{self.what}: blob {self.digest} ended early; restore it from a backup"
                )
            got += n
        self._hasher.update(view)
        self.remaining -= view.nbytes

    def verify(self) -> None:
        """Raise :class:`CorruptBlobError` unless the whole blob was read and hashes to its name."""
        if self.remaining:
            raise ValueError(f"{self.what}: {self.remaining} bytes of blob {self.digest} were never read")
        actual = self._hasher.hexdigest()
        if actual != self.digest:
            raise CorruptBlobError(
                f"{self.what}: blob {self.digest} is corrupted (its bytes hash to {actual}); "
                "restore it from a backup — the store does not repair it"
            )

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_blob_stream(
    backend: BlobBackend, digest: str, *, what: str, expect: TensorSpec
) -> BlobStream | None:
    """A :class:`BlobStream` over blob ``digest``, or None when its header is not a readable one-tensor
    header holding ``expect``'s dtype and shape (read it with :func:`read_blob` instead, which hashes
    the whole blob first and so reports a corrupted blob as such). Raises :class:`MissingBlobError`."""
    fh, size = backend.open_read(digest, what)
    try:
        found = _blob_header(fh, size)
        if found is None:
            fh.close()
            return None
        head, header = found
        spec, begin, _ = header.entries[BLOB_KEY]
        if (spec.dtype, spec.shape) != (expect.dtype, tuple(expect.shape)):
            fh.close()
            return None
        return BlobStream(fh, digest, what, spec, head, header.data_start + begin)
    except BaseException:
        fh.close()
        raise


def read_blob_header(backend: BlobBackend, digest: str, *, what: str) -> Header:
    """The parsed safetensors header of blob ``digest`` (only its first bytes are read; nothing is
    hashed). Raises :class:`SafetensorsFormatError` if it does not parse, :class:`MissingBlobError`."""
    fh, size = backend.open_read(digest, what)
    with fh:
        head = _read_header_bytes(fh, size)
    if head is None:
        raise SafetensorsFormatError(f"the header of a {size}-byte blob does not fit in it")
    return parse_header(head, size)


def _read_header_bytes(fh: BlobReader, size: int) -> bytes | None:
    """The 8-byte length and the JSON header of a safetensors file, or None if they cannot fit."""
    head = fh.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        return None
    rest = fh.read(n)
    return head + rest if len(rest) == n else None


def _blob_header(fh: BlobReader, size: int) -> tuple[bytes, Header] | None:
    """(header bytes, parsed header) of a one-tensor blob (its only key :data:`BLOB_KEY`), or None when
    the blob is empty or its header is cut short, unparsable or not a blob's."""
    head = _read_header_bytes(fh, size) if size else None
    if head is None:
        return None
    try:
        header = parse_header(head, size)
    except SafetensorsFormatError:
        return None
    return (head, header) if set(header.entries) == {BLOB_KEY} else None


def _read_blob_whole(fh: BlobReader, size: int, digest: str, what: str, check_hash: bool) -> torch.Tensor:
    """Memory-map (a local file) or read whole a blob whose header did not parse: hash first, then
    report the format error."""
    if not isinstance(fh, FileIO):
        fh.seek(0)
        data = bytearray(fh.read())
        return _decode_whole(data, len(data), digest, what, check_hash)
    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        return _decode_whole(mm, size, digest, what, check_hash)


def _decode_whole(
    mm: mmap.mmap | bytearray, size: int, digest: str, what: str, check_hash: bool
) -> torch.Tensor:
    if check_hash:
        actual = hashlib.sha256(mm).hexdigest()
        if actual != digest:
            raise CorruptBlobError(
                f"{what}: blob {digest} is corrupted (its bytes hash to {actual}); "
                "restore it from a backup — the store does not repair it"
            )
    try:
        header = parse_header(mm if isinstance(mm, mmap.mmap) else memoryview(mm), size)
        if set(header.entries) != {BLOB_KEY}:
            raise SafetensorsFormatError(f"holds {sorted(header.entries)}, expected [{BLOB_KEY!r}]")
        return tensor_from_buffer(mm, header, BLOB_KEY)
    except SafetensorsFormatError as exc:
        raise CorruptBlobError(f"{what}: blob {digest} is not a valid tensor blob: {exc}") from None
