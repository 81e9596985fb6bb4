"""Step 1 of a commit: what may be committed, and its tensors staged and published as blobs.

The checks every committed tensor, kept file and alias meets, and the two ways tensors become
durable blobs before the catalog sees them: :func:`write_blobs` (a whole mapping, hashed and written
by a thread pool) and :func:`stage_stream` (a stream of task-vector tensors, one at a time, each
checked against the base). Either way nothing is visible until :meth:`BlobBackend.publish`; an
exception removes the temporary files staged so far.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
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


@dataclass(frozen=True)
class StagedTensors:
    """A delta whose blobs are already published (:meth:`ModelStore.commit_stream`): name → entry."""

    entries: Mapping[str, TensorEntry]


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


def _publish(blobs: BlobBackend, staged: list[StagedBlob], fill: Iterable[StagedBlob]) -> None:
    """Collect the blobs ``fill`` stages into ``staged``, then publish them all (one batch of
    fsyncs before the renames); on any exception remove the temporary files staged so far."""
    try:
        for blob in fill:
            staged.append(blob)
    except BaseException:
        for blob in staged:
            if blob.tmp is not None:
                blob.tmp.unlink(missing_ok=True)
        raise
    blobs.publish(staged)


def write_blobs(
    blobs: BlobBackend, faults: FaultPoints, workers: int, tensors: Mapping[str, torch.Tensor]
) -> dict[str, tuple[str, list[Buffer]]]:
    """Stage every tensor as a blob (hashed while written, ``workers`` threads), then publish them
    with one batch of concurrent fsyncs before the renames; return name → (digest, bytes parts).
    The caller's :meth:`BlobBackend.sync` then makes the renames durable."""

    def one(item: tuple[str, torch.Tensor]) -> tuple[str, list[Buffer], StagedBlob]:
        header, data = encode_single(item[1], BLOB_KEY)
        parts: list[Buffer] = [header, data]
        return item[0], parts, blobs.stage(parts)

    items = sorted(tensors.items())
    out: dict[str, tuple[str, list[Buffer]]] = {}

    def fill() -> Iterable[StagedBlob]:
        if workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for name, parts, blob in pool.map(one, items):
                    out[name] = (blob.digest, parts)
                    faults.reached("blob")
                    yield blob
        else:
            for item in items:
                name, parts, blob = one(item)
                out[name] = (blob.digest, parts)
                faults.reached("blob")
                yield blob

    _publish(blobs, [], fill())
    return out


def stage_stream(
    blobs: BlobBackend,
    faults: FaultPoints,
    items: Iterable[tuple[str, torch.Tensor]],
    expected: Mapping[str, tuple[int, ...]],
    parent: str,
) -> dict[str, TensorEntry]:
    """Stage each (name, tensor) of a task vector on ``parent`` as a blob as it arrives, checked
    against ``expected`` (the base's floating shapes), then publish them all (one batch of fsyncs)."""
    entries: dict[str, TensorEntry] = {}

    def fill() -> Iterable[StagedBlob]:
        for name, tensor in items:
            check_tensors({name: tensor}, "delta")
            if name in entries:
                raise ConfigError(f"delta tensor {name!r} is given twice")
            if name not in expected:
                raise IncompatibleDeltasError(
                    f"delta tensor {name!r} is not a floating tensor of the base of {parent}", key=name
                )
            check_shapes(
                {name: tuple(tensor.shape)}, {name: expected[name]}, what=f"delta for parent {parent}"
            )
            check_floating(name, tensor)
            header, data = encode_single(tensor, BLOB_KEY)
            blob = blobs.stage([header, data])
            entries[name] = tensor_entry(blob.digest, tensor)
            faults.reached("blob")
            yield blob
        missing = sorted(set(expected) - set(entries))
        if missing:
            raise IncompatibleDeltasError(
                f"delta for parent {parent} lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}",
                key=missing[0],
            )

    _publish(blobs, [], fill())
    return entries


__all__ = [
    "RESERVED_FILE_NAMES",
    "StagedTensors",
    "check_alias_name",
    "check_file_name",
    "check_floating",
    "check_tensors",
    "file_tensor",
    "floating_shapes",
    "stage_stream",
    "tensor_entry",
    "write_blobs",
]
