"""Step 1 of a commit: what may be committed, and its tensors staged and published as blobs.

The checks every committed tensor, kept file and alias meets, and the one way tensors become
durable blobs before the catalog sees them: :func:`stage_tensors`, fed a stream of (name, tensor)
pairs (a streamed merge, one tensor at a time) or a whole mapping's items (in memory: hashed and
written by a thread pool), each tensor checked as it arrives (against the base for a task vector).
Nothing is visible until :meth:`BlobBackend.publish`; an exception removes the temporary files
staged so far. A commit reaches one fault point (:mod:`.faults`) per blob staged here.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fedmerge.delta.state_dict import check_shapes
from fedmerge.errors import ConfigError, IncompatibleDeltasError
from fedmerge.store.blobs import BLOB_KEY, BlobBackend, Buffer, StagedBlob
from fedmerge.store.errors import InvalidAliasError
from fedmerge.store.faults import FaultPoints
from fedmerge.store.manifest import TensorEntry, Version, is_version_id
from fedmerge.store.safetensors_format import dtype_from_name, dtype_name, encode_single

_ALIAS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

RESERVED_FILE_NAMES = frozenset({"README.md", "fedmerge-version.json", "model.safetensors.index.json"})
"""Names an export writes itself; a root's files cannot take them."""


def check_alias_name(name: str) -> None:
    """Aliases are 1–64 of ``[A-Za-z0-9_.-]``, start with a letter and never look like a version id."""
    if not (1 <= len(name) <= 64) or not name[0].isalpha() or not set(name) <= _ALIAS_CHARS:
        raise InvalidAliasError(
            f"alias {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '-', starting with a letter"
        )
    if is_version_id(name):
        raise InvalidAliasError(f"alias {name!r} looks like a version id; pick a name such as 'prod'")


def check_file_name(name: str) -> None:
    """A kept file is a plain file name: no directory part, not hidden, not a weight file, not a name
    the export writes itself (:data:`RESERVED_FILE_NAMES`)."""
    bad = (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or name.startswith(".")
        or name.endswith(".safetensors")
        or name in RESERVED_FILE_NAMES
    )
    if bad:
        raise ConfigError(
            f"file name {name!r} cannot be kept with a version: use a plain file name (no '/', not hidden, "
            f"not *.safetensors or one of {sorted(RESERVED_FILE_NAMES)})"
        )


def file_tensor(data: bytes) -> torch.Tensor:
    """The bytes of a kept file as the 1-D uint8 tensor its blob holds."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def check_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Non-empty string names, dense strided ``torch.Tensor`` values of a dtype safetensors holds."""
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what} has key {name!r}; tensor names must be non-empty strings")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{what}[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.is_sparse or t.layout != torch.strided:
            raise ConfigError(f"{what}[{name!r}] has layout {t.layout}; densify it before committing")
        dtype_name(t.dtype)  # raises for dtypes safetensors cannot hold


def floating_shapes(root: Version) -> dict[str, tuple[int, ...]]:
    """Name → shape of the root's floating tensors: exactly what a task vector on it must hold."""
    return {n: e.shape for n, e in root.tensors.items() if dtype_from_name(e.dtype).is_floating_point}


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """A task-vector tensor is floating."""
    if not tensor.is_floating_point():
        raise IncompatibleDeltasError(
            f"delta tensor {name!r} is {tensor.dtype}; task vectors are floating", key=name
        )


def tensor_entry(digest: str, tensor: torch.Tensor) -> TensorEntry:
    """The manifest entry of ``tensor`` stored as blob ``digest``."""
    return TensorEntry(blob=digest, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))


@dataclass
class Staged:
    """Tensors staged and published as blobs: name → manifest entry, and the blobs' bytes by digest
    when they were kept (an in-memory source: a blob a concurrent gc removes is written again)."""

    entries: dict[str, TensorEntry]
    kept: dict[str, list[Buffer]]


def _encode_and_stage(blobs: BlobBackend, tensor: torch.Tensor) -> tuple[list[Buffer], StagedBlob]:
    header, data = encode_single(tensor, BLOB_KEY)
    parts: list[Buffer] = [header, data]
    return parts, blobs.stage(parts)


def _drop(staged: Iterable[StagedBlob]) -> None:
    for blob in staged:
        if blob.tmp is not None:
            blob.tmp.unlink(missing_ok=True)


def stage_tensors(
    blobs: BlobBackend,
    faults: FaultPoints,
    items: Iterable[tuple[str, torch.Tensor]],
    *,
    what: str,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    parent: str | None = None,
    workers: int = 1,
    keep: bool = False,
) -> Staged:
    """Stage each (name, tensor) of ``items`` as a blob as it arrives, then publish them all (one
    batch of concurrent fsyncs before the renames); the caller's :meth:`BlobBackend.sync` then makes
    the renames durable. The one way tensors become blobs before a commit's catalog row.

    Each tensor is checked as it arrives (:func:`check_tensors`, names unique) and, with ``expected``
    (a task vector on ``parent``: the base's floating shapes), against the base: a known name, its
    shape, a floating dtype, and at the end no tensor of the base missing. ``workers`` > 1 encodes,
    hashes and writes up to ``workers`` tensors at once (so holds as many: while the last of them is
    staged, the source produces the next); 1 holds one tensor whatever the source's length. ``keep``:
    keep the blobs' bytes (:attr:`Staged.kept`). On any exception (from ``items``, a check or a write)
    the temporary files staged so far are removed.
    """
    entries: dict[str, TensorEntry] = {}
    kept: dict[str, list[Buffer]] = {}
    staged: list[StagedBlob] = []

    def check(name: str, tensor: torch.Tensor) -> None:
        check_tensors({name: tensor}, what)
        if name in entries or name in pending:
            raise ConfigError(f"{what} tensor {name!r} is given twice")
        if expected is None:
            return
        if name not in expected:
            raise IncompatibleDeltasError(
                f"{what} tensor {name!r} is not a floating tensor of the base of {parent}", key=name
            )
        check_shapes({name: tuple(tensor.shape)}, {name: expected[name]}, what=f"{what} for parent {parent}")
        check_floating(name, tensor)

    def done(name: str, tensor: torch.Tensor, parts: list[Buffer], blob: StagedBlob) -> None:
        staged.append(blob)
        entries[name] = tensor_entry(blob.digest, tensor)
        if keep:
            kept[blob.digest] = parts
        faults.reached("blob")

    def _finish(item: tuple[str, torch.Tensor, Future[tuple[list[Buffer], StagedBlob]]]) -> None:
        name, tensor, future = item
        del pending[name]
        done(name, tensor, *future.result())

    pending: dict[str, None] = {}  # names handed to the pool, not yet done
    window: deque[tuple[str, torch.Tensor, Future[tuple[list[Buffer], StagedBlob]]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for name, tensor in items:
            check(name, tensor)
            if pool is None:
                done(name, tensor, *_encode_and_stage(blobs, tensor))
                del tensor  # not held while the source produces the next
                continue
            pending[name] = None
            window.append((name, tensor, pool.submit(_encode_and_stage, blobs, tensor)))
            del tensor  # held by the window only: released as soon as it is staged
            while len(window) >= workers:
                _finish(window.popleft())
        while window:
            _finish(window.popleft())
        missing = sorted(set(expected or ()) - set(entries))
        if missing:
            raise IncompatibleDeltasError(
                f"{what} for parent {parent} lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}",
                key=missing[0],
            )
    except BaseException:
        for _, _, future in window:  # in flight: wait for each, then remove what it staged
            with contextlib.suppress(BaseException):  # a failed write removed its own file
                _drop([future.result()[1]])
        _drop(staged)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    blobs.publish(staged)
    return Staged(entries, kept)


__all__ = [
    "RESERVED_FILE_NAMES",
    "Staged",
    "check_alias_name",
    "check_file_name",
    "check_floating",
    "check_tensors",
    "file_tensor",
    "floating_shapes",
    "stage_tensors",
    "tensor_entry",
]
