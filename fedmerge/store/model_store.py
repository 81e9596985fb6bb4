"""``ModelStore``: the facade over blobs, manifests and the catalog.

Layout of a store directory::

    store.json                      marks the directory as a store; layout format_version
    catalog.sqlite (+ -wal, -shm)   the catalog (which versions exist, aliases); see catalog.py
    manifests/v000012.json          one immutable manifest per version; see manifest.py
    blobs/ab/ab…(64 hex).safetensors one tensor per blob, named by the sha256 of its bytes; see blobs.py
    tmp/                            files being written (temporary names); removed by gc

Commit protocol (each step durable before the next):

1. every tensor is written as a blob: temporary files (hashed while written) → one batch of
   concurrent fsyncs → renames; then the blob directories are fsynced. Blobs are content-addressed,
   so a crash here leaves only temporary files and unreferenced blobs.
2. ``BEGIN IMMEDIATE`` on the catalog (the writer lock); the next sequence number becomes the id
   ``v{seq:06d}``; blobs are re-checked (a concurrent ``gc`` may have removed a reused one; it is
   rewritten); the manifest is written temporary → fsync → rename.
3. the version, its parents, contributors, blob references and alias moves are inserted and the
   transaction commits. Only now is the version visible. A crash before this leaves a manifest
   file no catalog row points to; the next commit reuses its id and overwrites it, ``gc`` removes
   it after the grace period, ``verify`` lists it as a leftover, not an error.

A delta version's tensors are relative to the materialised weights of ``parents[0]``; the chain of
first parents ends at a ``full`` root (``commit_base``), whose floating tensors fix the names and
shapes every delta must have.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmerge import FORMAT_VERSION
from fedmerge.delta.state_dict import StateDict, accumulation_dtype, check_shapes, shapes_of
from fedmerge.errors import ConfigError, IncompatibleDeltasError, StoreIntegrityError
from fedmerge.store.blobs import (
    BLOB_KEY,
    BlobBackend,
    Buffer,
    LocalBlobBackend,
    StagedBlob,
    fsync_dir,
    read_blob,
    write_atomic,
)
from fedmerge.store.catalog import Catalog, VersionRow
from fedmerge.store.catalogs import open_catalog
from fedmerge.store.errors import InvalidAliasError, MissingBlobError, UnknownVersionError
from fedmerge.store.export import DEFAULT_MAX_SHARD_BYTES, ExportResult, export_safetensors
from fedmerge.store.faults import FaultPoints
from fedmerge.store.gc import GcReport
from fedmerge.store.gc import gc as gc_store
from fedmerge.store.manifest import (
    KINDS,
    Contributor,
    TensorEntry,
    Version,
    build_version,
    check_json_value,
    from_json,
    is_version_id,
    materialisable,
    utc_now,
    version_id,
)
from fedmerge.store.s3 import S3BlobBackend, is_s3_url
from fedmerge.store.safetensors_format import TensorSpec, dtype_from_name, dtype_name, encode_single
from fedmerge.store.verify import VerifyReport
from fedmerge.store.verify import verify as verify_store

STORE_MARKER = "store.json"
STORE_LAYOUT = "fedmerge-store"
CATALOG_FILE = "catalog.sqlite"
_ALIAS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor changed from version ``a`` to ``b``: ‖θ_a‖₂, ‖θ_b‖₂, ‖θ_b − θ_a‖₂ (fp64)."""

    name: str
    norm_a: float
    norm_b: float
    change_norm: float

    @property
    def relative_change(self) -> float:
        """‖θ_b − θ_a‖₂ / ‖θ_a‖₂ (inf when θ_a = 0 and something changed, 0 when nothing did)."""
        if self.norm_a == 0.0:
            return 0.0 if self.change_norm == 0.0 else float("inf")
        return self.change_norm / self.norm_a


@dataclass(frozen=True)
class Diff:
    a: str
    b: str
    tensors: list[TensorDiff]

    @property
    def total_change_norm(self) -> float:
        """‖θ_b − θ_a‖₂ over all tensors together."""
        return float(sum(t.change_norm**2 for t in self.tensors) ** 0.5)


@dataclass(frozen=True)
class Lineage:
    """The ancestry graph of ``version``: every ancestor (itself included) → its parents, in order."""

    version: str
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def ancestors(self) -> list[str]:
        """All nodes, newest (highest sequence) first."""
        return sorted(self.parents, reverse=True)

    def edges(self) -> list[tuple[str, str]]:
        """(child, parent) pairs, newest child first."""
        return [(c, p) for c in self.ancestors() for p in self.parents[c]]

    def roots(self) -> list[str]:
        return [v for v in self.ancestors() if not self.parents[v]]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_alias_name(name: str) -> None:
    """Aliases are 1–64 of ``[A-Za-z0-9_.-]``, start with a letter and never look like a version id."""
    if not (1 <= len(name) <= 64) or not name[0].isalpha() or not set(name) <= _ALIAS_CHARS:
        raise InvalidAliasError(
            f"alias {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '-', starting with a letter"
        )
    if is_version_id(name):
        raise InvalidAliasError(f"alias {name!r} looks like a version id; pick a name such as 'prod'")


@dataclass(frozen=True)
class StagedTensors:
    """A delta whose blobs are already published (:meth:`ModelStore.commit_stream`): name → entry."""

    entries: Mapping[str, TensorEntry]


class TensorView(Mapping[str, torch.Tensor]):
    """A read-only mapping name → tensor that reads each tensor from the store when it is looked up.

    Nothing is cached: memory holds the tensors the caller keeps. ``shapes`` and ``dtypes`` come from
    the manifest without reading a blob."""

    def __init__(self, specs: Sequence[TensorSpec], read: Callable[[str], torch.Tensor]) -> None:
        self._specs = {s.name: s for s in specs}
        self._read = read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._specs:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s.shape) for n, s in sorted(self._specs.items())}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: s.dtype for n, s in sorted(self._specs.items())}


def _entry(digest: str, tensor: torch.Tensor) -> TensorEntry:
    return TensorEntry(blob=digest, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))


RESERVED_FILE_NAMES = frozenset({"README.md", "fedmerge-version.json", "model.safetensors.index.json"})
"""Names an export writes itself; a root's files cannot take them."""


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


def _check_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what} has key {name!r}; tensor names must be non-empty strings")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{what}[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.is_sparse or t.layout != torch.strided:
            raise ConfigError(f"{what}[{name!r}] has layout {t.layout}; densify it before committing")
        dtype_name(t.dtype)  # raises for dtypes safetensors cannot hold


class ModelStore:
    """Immutable, content-addressed, crash-safe model versions in a directory (see the module doc)."""

    def __init__(self, root: Path, catalog: Catalog, blobs: BlobBackend, workers: int) -> None:
        self.root = root
        self.catalog = catalog
        self.blobs = blobs
        self.manifest_dir = root / "manifests"
        self.workers = workers
        self._faults = FaultPoints.from_env()
        self._cache: dict[str, Version] = {}

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        catalog: str | None = None,
        *,
        busy_timeout: float = 30.0,
        workers: int = 4,
        s3_endpoint: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> ModelStore:
        """Open the store at ``path``, creating the layout if the directory is missing or empty.

        A non-empty directory without ``store.json`` is refused (``StoreIntegrityError``) rather
        than written into. ``busy_timeout`` bounds how long a commit waits for another writer.
        ``workers`` threads hash and write blobs in parallel. ``catalog``: None keeps the catalog in
        ``catalog.sqlite`` inside the store; a ``postgresql://`` URL keeps it in that database
        (:class:`~fedmerge.store.pg_catalog.PgCatalog`), shared by every server opening the store.

        ``path`` may be ``s3://bucket/prefix``: the blobs (and a copy of each manifest) then live in
        that bucket (:class:`~fedmerge.store.s3.S3BlobBackend`; endpoint ``s3_endpoint`` or
        ``AWS_ENDPOINT_URL``, credentials from boto3's chain), and ``cache_dir`` (default
        :func:`~fedmerge.store.s3.default_cache_dir`) holds the read-through cache, the manifests
        read so far and, without a ``catalog`` URL, the SQLite catalog.
        """
        blobs: BlobBackend | None = None
        if is_s3_url(path):
            s3 = S3BlobBackend.connect(str(path), endpoint=s3_endpoint, cache_dir=cache_dir)
            path, blobs = s3.root, s3
        root = Path(path)
        marker = root / STORE_MARKER
        if not marker.exists():
            if root.exists() and any(root.iterdir()):
                raise StoreIntegrityError(
                    f"{root} is not empty and has no {STORE_MARKER}: it is not a fedmerge store; "
                    "pass an empty or new directory"
                )
            root.mkdir(parents=True, exist_ok=True)
            (root / "tmp").mkdir(exist_ok=True)
            doc = {"layout": STORE_LAYOUT, "format_version": FORMAT_VERSION, "created_at": utc_now()}
            write_atomic(marker, [json.dumps(doc, indent=1).encode() + b"\n"], root / "tmp")
        try:
            doc = json.loads(marker.read_text())
            layout, fmt = doc["layout"], doc["format_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreIntegrityError(f"{marker} is unreadable ({exc!r}); restore it from a backup") from None
        if layout != STORE_LAYOUT or fmt != FORMAT_VERSION:
            raise StoreIntegrityError(
                f"{marker} declares layout {layout!r} format {fmt!r}; this fedmerge reads {STORE_LAYOUT!r} "
                f"format {FORMAT_VERSION} — use the fedmerge version that wrote the store"
            )
        (root / "manifests").mkdir(exist_ok=True)
        if blobs is None:
            blobs = LocalBlobBackend(root)
        return cls(root, open_catalog(root, catalog, busy_timeout), blobs, max(1, workers))

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- committing ------------------------------------------------------------------------------

    def commit_base(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        name: str,
        metadata: dict[str, Any] | None = None,
        aliases: Sequence[str] = ("latest",),
        files: Mapping[str, bytes] | None = None,
    ) -> Version:
        """Commit full weights as a root version (no parents, kind ``full``).

        ``files`` (file name → bytes: ``config.json``, tokenizer files, …) are kept with the root as
        content-addressed blobs under the same commit protocol as tensors, and written next to the
        weights by every export of every version descending from it. To start from a Hugging Face
        directory, a safetensors file or a peft adapter use :func:`fedmerge.store.init.init_store`.
        """
        if not weights:
            raise ConfigError("commit_base got no tensors; pass the base model's state dict")
        for fname, data in (files or {}).items():
            check_file_name(fname)
            if not isinstance(data, bytes | bytearray):
                raise ConfigError(f"file {fname!r} is a {type(data).__name__}; pass its bytes")
        return self._commit(
            weights,
            kind="full",
            parents=[],
            name=name,
            method="base",
            params={},
            contributors=[],
            round=None,
            metrics={},
            privacy=None,
            metadata=metadata or {},
            state=None,
            aliases=aliases,
            files=files,
        )

    def commit(
        self,
        delta: StateDict,
        *,
        parents: list[str],
        kind: str = "task_vector",
        method: str,
        params: dict[str, Any],
        contributors: list[Contributor],
        round: int | None,
        metrics: dict[str, Any],
        privacy: dict[str, Any] | None,
        state: StateDict | None = None,
        aliases: Sequence[str] = ("latest",),
        metadata: dict[str, Any] | None = None,
    ) -> Version:
        """Atomically commit ``delta`` (relative to ``parents[0]``) as a new version and move ``aliases``.

        ``kind="task_vector"`` deltas must have exactly the names and shapes of the base's floating
        tensors; ``kind="lora"`` stores LoRA factors as given. ``state`` holds opaque aggregator
        tensors persisted with the version. Returns the committed :class:`Version`.
        """
        if kind not in KINDS or kind == "full":
            raise ConfigError(
                f"kind {kind!r} is not a delta kind; use 'task_vector' or 'lora' (or commit_base)"
            )
        if not parents:
            raise ConfigError(
                "a delta needs at least one parent version; commit full weights with commit_base"
            )
        return self._commit(
            delta,
            kind=kind,
            parents=list(parents),
            name=None,
            method=method,
            params=params,
            contributors=list(contributors),
            round=round,
            metrics=metrics,
            privacy=privacy,
            metadata=metadata or {},
            state=state,
            aliases=aliases,
        )

    def commit_stream(
        self,
        delta: Iterable[tuple[str, torch.Tensor]],
        *,
        parents: list[str],
        method: str,
        params: dict[str, Any],
        contributors: list[Contributor],
        round: int | None,
        metrics: dict[str, Any],
        privacy: dict[str, Any] | None,
        aliases: Sequence[str] = ("latest",),
        metadata: dict[str, Any] | None = None,
    ) -> Version:
        """:meth:`commit` of a task vector given as (name, tensor) pairs, consumed one at a time.

        Each tensor is checked against the base's floating tensors (name, shape, floating dtype) and
        staged as a blob as it arrives, so memory holds one tensor whatever the model size. The same
        promise as :meth:`commit`: nothing is visible until every blob is durable and the catalog row
        is written; an exception raised by ``delta`` (or by a check) aborts the commit and removes the
        staged blobs, leaving the store as it was.
        """
        if not parents:
            raise ConfigError(
                "a delta needs at least one parent version; commit full weights with commit_base"
            )
        parent_versions = self._validate_parents(list(parents), "task_vector", None)
        root = self.root_of(parent_versions[0])
        expected = {n: e.shape for n, e in root.tensors.items() if dtype_from_name(e.dtype).is_floating_point}
        return self._commit(
            StagedTensors(self._stage_stream(delta, expected, parent_versions[0].id)),
            kind="task_vector",
            parents=list(parents),
            name=None,
            method=method,
            params=params,
            contributors=list(contributors),
            round=round,
            metrics=metrics,
            privacy=privacy,
            metadata=metadata or {},
            state=None,
            aliases=aliases,
        )

    def _stage_stream(
        self, items: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]], parent: str
    ) -> dict[str, TensorEntry]:
        """Stage each (name, tensor) as a blob as it arrives, then publish them all (one batch of fsyncs)."""
        entries: dict[str, TensorEntry] = {}
        staged: list[StagedBlob] = []
        try:
            for name, tensor in items:
                _check_tensors({name: tensor}, "delta")
                if name in entries:
                    raise ConfigError(f"delta tensor {name!r} is given twice")
                if name not in expected:
                    raise IncompatibleDeltasError(
                        f"delta tensor {name!r} is not a floating tensor of the base of {parent}", key=name
                    )
                check_shapes(
                    {name: tuple(tensor.shape)}, {name: expected[name]}, what=f"delta for parent {parent}"
                )
                if not tensor.is_floating_point():
                    raise IncompatibleDeltasError(
                        f"delta tensor {name!r} is {tensor.dtype}; task vectors are floating", key=name
                    )
                header, data = encode_single(tensor, BLOB_KEY)
                blob = self.blobs.stage([header, data])
                staged.append(blob)
                entries[name] = _entry(blob.digest, tensor)
                self._faults.reached("blob")
            missing = sorted(set(expected) - set(entries))
            if missing:
                raise IncompatibleDeltasError(
                    f"delta for parent {parent} lacks {len(missing)} tensor(s) of the base, "
                    f"e.g. {missing[0]!r}",
                    key=missing[0],
                )
        except BaseException:
            for blob in staged:
                if blob.tmp is not None:
                    blob.tmp.unlink(missing_ok=True)
            raise
        self.blobs.publish(staged)
        return entries

    def _validate_parents(
        self, parents: list[str], kind: str, tensors: Mapping[str, torch.Tensor] | None
    ) -> list[Version]:
        resolved = [self.get(p) for p in parents]
        if len({v.id for v in resolved}) != len(resolved):
            raise ConfigError(f"parents {parents} name the same version twice")
        roots = {self.root_of(v).id for v in resolved}
        if len(roots) != 1:
            raise IncompatibleDeltasError(
                f"parents {parents} descend from different base versions {sorted(roots)}; "
                "a version can only merge versions of the same base model"
            )
        if kind == "task_vector" and tensors is not None:
            root = self.root_of(resolved[0])
            floating = {
                n: e.shape for n, e in root.tensors.items() if dtype_from_name(e.dtype).is_floating_point
            }
            check_shapes(shapes_of(tensors), floating, what=f"delta for parent {resolved[0].id}")
            for name, t in tensors.items():
                if not t.is_floating_point():
                    raise IncompatibleDeltasError(
                        f"delta tensor {name!r} is {t.dtype}; task vectors are floating", key=name
                    )
        return resolved

    def _write_blobs(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, list[Buffer]]]:
        """Stage every tensor as a blob (hashed while written, in parallel), then publish them with
        one batch of concurrent fsyncs before the renames; return name → (digest, bytes parts).
        The caller's :meth:`LocalBlobBackend.sync` then makes the renames durable."""

        def one(item: tuple[str, torch.Tensor]) -> tuple[str, list[Buffer], StagedBlob]:
            header, data = encode_single(item[1], BLOB_KEY)
            parts: list[Buffer] = [header, data]
            return item[0], parts, self.blobs.stage(parts)

        items = sorted(tensors.items())
        out: dict[str, tuple[str, list[Buffer]]] = {}
        staged: list[StagedBlob] = []
        try:
            if self.workers > 1 and len(items) > 1:
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    for name, parts, blob in pool.map(one, items):
                        out[name] = (blob.digest, parts)
                        staged.append(blob)
                        self._faults.reached("blob")
            else:
                for item in items:
                    name, parts, blob = one(item)
                    out[name] = (blob.digest, parts)
                    staged.append(blob)
                    self._faults.reached("blob")
        except BaseException:
            for blob in staged:
                if blob.tmp is not None:
                    blob.tmp.unlink(missing_ok=True)
            raise
        self.blobs.publish(staged)
        return out

    def _commit(
        self,
        tensors: Mapping[str, torch.Tensor] | StagedTensors,
        *,
        kind: str,
        parents: list[str],
        name: str | None,
        method: str,
        params: dict[str, Any],
        contributors: list[Contributor],
        round: int | None,
        metrics: dict[str, Any],
        privacy: dict[str, Any] | None,
        metadata: dict[str, Any],
        state: Mapping[str, torch.Tensor] | None,
        aliases: Sequence[str],
        files: Mapping[str, bytes] | None = None,
    ) -> Version:
        if not isinstance(tensors, StagedTensors):
            _check_tensors(tensors, "delta" if kind != "full" else "weights")
        if state is not None:
            _check_tensors(state, "state")
        for what, value in (
            ("params", params),
            ("metrics", metrics),
            ("privacy", privacy),
            ("metadata", metadata),
        ):
            check_json_value(value, what)
        if round is not None and (not isinstance(round, int) or isinstance(round, bool) or round < 0):
            raise ConfigError(f"round is {round!r}; pass a non-negative int or None")
        for c in contributors:
            if not isinstance(c, Contributor):
                raise ConfigError(f"contributors must be Contributor instances, got {type(c).__name__}")
        for alias in aliases:
            check_alias_name(alias)
        staged = tensors if isinstance(tensors, StagedTensors) else None
        parent_versions = (
            self._validate_parents(parents, kind, None if staged else tensors)  # type: ignore[arg-type]
            if parents
            else []
        )
        if staged is not None:  # streamed: blobs staged and published by commit_stream, bytes not kept
            written: dict[str, tuple[str, list[Buffer]]] = {}
            entries = dict(staged.entries)
        else:
            assert not isinstance(tensors, StagedTensors)
            written = self._write_blobs(tensors)
            entries = {n: _entry(d, tensors[n]) for n, (d, _) in written.items()}
        state_written = self._write_blobs(state) if state else {}
        file_tensors = {n: file_tensor(bytes(b)) for n, b in (files or {}).items()}
        files_written = self._write_blobs(file_tensors) if file_tensors else {}
        self.blobs.sync()
        self._faults.reached("blobs-synced")

        root = self.root_of(parent_versions[0]) if parent_versions else None
        fields: dict[str, Any] = {
            "kind": kind,
            "parents": tuple(v.id for v in parent_versions),
            "parent_hashes": tuple(v.content_hash for v in parent_versions),
            "base_version": root.id if root else None,
            "base_hash": root.content_hash if root else None,
            "name": name,
            "tensors": entries,
            "state": {n: _entry(d, state[n]) for n, (d, _) in state_written.items()} if state else {},
            "method": method,
            "params": params,
            "contributors": tuple(contributors),
            "round": round,
            "metrics": metrics,
            "privacy": privacy,
            "metadata": metadata,
            "files": {n: _entry(d, file_tensors[n]) for n, (d, _) in files_written.items()},
        }
        with self.catalog.write() as conn:
            seq = self.catalog.next_sequence(conn)
            vid = version_id(seq)
            version = build_version(vid, utc_now(), **fields)
            rewritten = False
            for name, entry in staged.entries.items() if staged else ():
                if not self.blobs.has(entry.blob):  # its bytes were not kept: the commit cannot redo it
                    raise MissingBlobError(
                        f"blob of {name!r} was removed by a concurrent gc before the commit; commit again"
                    )
            every = {**dict(written.values()), **dict(state_written.values()), **dict(files_written.values())}
            for digest, parts in every.items():
                if not self.blobs.has(digest):  # removed by a concurrent gc since step 1
                    self.blobs.put(digest, parts)
                    rewritten = True
            if rewritten:
                self.blobs.sync()
            manifest = version.to_json().encode()
            self.blobs.put_manifest(f"{vid}.json", manifest)
            write_atomic(self.manifest_dir / f"{vid}.json", [manifest], self.blobs.tmp_dir)
            fsync_dir(self.manifest_dir)
            self._faults.reached("manifest")
            row = VersionRow(
                seq=seq,
                id=vid,
                content_hash=version.content_hash,
                manifest_sha256=_sha256_bytes(manifest),
                kind=kind,
                method=method,
                round=round,
                base_version=version.base_version,
                created_at=version.created_at,
            )
            self.catalog.insert_version(
                conn,
                row,
                list(version.parents),
                [(c.client_id, c.num_examples, c.submission_hash, c.accepted) for c in contributors],
                version.blobs,
            )
            for alias in aliases:
                self.catalog.move_alias(conn, alias, vid, "set", version.created_at)
            self._faults.reached("catalog-insert")
        self._faults.reached("committed")
        self._cache[vid] = version
        return version

    # -- reading ---------------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The version id that ``ref`` (an id or an alias) names; :class:`UnknownVersionError` if none."""
        if is_version_id(ref):
            if self.catalog.row(ref) is None:
                raise UnknownVersionError(
                    f"no committed version {ref!r}; `fedmerge store versions` lists them"
                )
            return ref
        target = self.catalog.alias(ref)
        if target is None:
            known = ", ".join(sorted(self.catalog.aliases())) or "none yet"
            raise UnknownVersionError(f"{ref!r} is neither a version id nor an alias (aliases: {known})")
        return target

    def get(self, ref: str) -> Version:
        """The committed version named by id or alias (its manifest checked against the catalog)."""
        vid = self.resolve(ref)
        cached = self._cache.get(vid)
        if cached is not None:
            return cached
        row = self.catalog.row(vid)
        assert row is not None
        version = self.read_manifest(row)
        self._cache[vid] = version
        return version

    def read_manifest(self, row: VersionRow) -> Version:
        """The manifest of a catalog row, read and checked against the row (a missing or altered
        manifest is a :class:`StoreIntegrityError`)."""
        path = self.manifest_dir / f"{row.id}.json"
        raw: bytes | None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            kept = self.blobs.get_manifest(path.name)  # committed by another server on the shared store
            if kept is not None and _sha256_bytes(kept) == row.manifest_sha256:
                write_atomic(path, [kept], self.blobs.tmp_dir)
                raw = kept
            else:
                raw = None
        if raw is None:
            raise StoreIntegrityError(
                f"version {row.id}: manifest {path} is missing although the catalog lists it; "
                "restore it from a backup"
            ) from None
        actual = _sha256_bytes(raw)
        if actual != row.manifest_sha256:
            raise StoreIntegrityError(
                f"version {row.id}: manifest {path} hashes to {actual}, the catalog recorded "
                f"{row.manifest_sha256}: it was modified after commit; restore it from a backup"
            )
        version = from_json(raw, source=str(path))
        if version.id != row.id or version.content_hash != row.content_hash:
            raise StoreIntegrityError(
                f"version {row.id}: manifest {path} describes {version.id} ({version.content_hash}); "
                "restore the right manifest from a backup"
            )
        return version

    def root_of(self, version: Version) -> Version:
        """The ``full`` version at the end of ``version``'s first-parent chain."""
        return version if version.kind == "full" else self.get(version.base_version or "")

    def chain(self, version: Version) -> list[Version]:
        """[root, …, version] following first parents."""
        out = [version]
        while out[-1].kind != "full":
            out.append(self.get(out[-1].parents[0]))
        return out[::-1]

    def _read(self, version: Version, name: str, entry: TensorEntry, *, part: str = "tensor") -> torch.Tensor:
        return read_blob(self.blobs, entry.blob, what=f"version {version.id} {part} {name!r}")

    def load_delta(self, ref: str | Version) -> StateDict:
        """The tensors stored in the version (a delta, or the weights of a ``full`` root)."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        return {n: self._read(version, n, e) for n, e in sorted(version.tensors.items())}

    def read_files(self, ref: str | Version) -> dict[str, bytes]:
        """The non-tensor files kept with the version's root (file name → bytes, each re-hashed)."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        root = self.root_of(version)
        return {
            n: self._read(root, n, e, part="file").numpy().tobytes() for n, e in sorted(root.files.items())
        }

    def load_state(self, ref: str | Version) -> StateDict | None:
        """The aggregator state stored with the version, or ``None`` if it has none."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        if not version.state:
            return None
        return {n: self._read(version, n, e, part="state") for n, e in sorted(version.state.items())}

    def materialized_specs(self, ref: str | Version) -> list[TensorSpec]:
        """Names, dtypes and shapes of the materialised weights, in the order they are yielded."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        root = self.root_of(version)
        return [TensorSpec(n, dtype_from_name(e.dtype), e.shape) for n, e in sorted(root.tensors.items())]

    def iter_materialized(self, ref: str | Version) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, θ) of the full weights, one tensor at a time, sorted by name.

        θ = θ_root + Σ_k τ_k over the first-parent chain, summed in fp32 (fp64 stays fp64) and cast
        to the root's dtype; non-floating tensors come from the root unchanged. Memory: one tensor
        (plus the one being added), whatever the model size.
        """
        version = ref if isinstance(ref, Version) else self.get(ref)
        root, deltas = materialisable(version, self.chain(version))
        for name in sorted(root.tensors):
            yield name, self._materialized(root, deltas, name)

    def weights_view(self, ref: str | Version) -> TensorView:
        """θ of the version as a :class:`TensorView`: each tensor materialised when it is looked up."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        return TensorView(
            self.materialized_specs(version), lambda name: self.materialized_tensor(version, name)
        )

    def delta_view(self, ref: str | Version) -> TensorView:
        """The tensors stored in the version (:meth:`load_delta`) as a :class:`TensorView`."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        specs = [TensorSpec(n, dtype_from_name(e.dtype), e.shape) for n, e in sorted(version.tensors.items())]
        return TensorView(specs, lambda name: self._read(version, name, version.tensors[name]))

    def materialized_tensor(self, ref: str | Version, name: str) -> torch.Tensor:
        """θ[name] of the version's full weights, as :meth:`iter_materialized` yields it."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        chain = self.chain(version)
        if name not in chain[0].tensors:
            raise KeyError(name)
        return self._materialized(chain[0], chain[1:], name)

    def _materialized(self, root: Version, deltas: Sequence[Version], name: str) -> torch.Tensor:
        weight = self._read(root, name, root.tensors[name])
        if not weight.is_floating_point() or not deltas:
            return weight
        acc = weight.to(accumulation_dtype(weight.dtype))
        for d in deltas:
            if d.kind != "task_vector":
                raise ConfigError(f"version {d.id} of kind {d.kind!r} does not materialise; densify it first")
            acc += self._read(d, name, d.tensors[name]).to(acc.dtype)
        return acc.to(weight.dtype)

    def iter_total_delta(self, ref: str | Version) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, Σ_k τ_k) over the first-parent chain (θ_version − θ_root), fp32, sorted by name.

        Empty for a ``full`` root. One tensor in memory at a time.
        """
        version = ref if isinstance(ref, Version) else self.get(ref)
        deltas = self.chain(version)[1:]
        if not deltas:
            return
        for d in deltas:
            if d.kind != "task_vector":
                raise ConfigError(
                    f"version {version.id} descends through {d.id} of kind {d.kind!r}; "
                    "only task-vector chains can be summed"
                )
        for name in sorted(deltas[-1].tensors):
            acc: torch.Tensor | None = None
            for d in deltas:
                t = self._read(d, name, d.tensors[name])
                acc = t.to(accumulation_dtype(t.dtype)) if acc is None else acc + t.to(acc.dtype)
            assert acc is not None
            yield name, acc

    def materialize(self, ref: str | Version) -> StateDict:
        """The full weights of a version as one state dict (see :meth:`iter_materialized`)."""
        return dict(self.iter_materialized(ref))

    # -- listing ---------------------------------------------------------------------------------

    def list(self, limit: int | None = None) -> list[Version]:
        """Every committed version, newest first."""
        return [self.get(v) for v in self.catalog.query_ids(limit=limit)]

    def query(
        self,
        *,
        alias: str | None = None,
        round: int | None = None,
        contributor: str | None = None,
        method: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[Version]:
        """Versions matching every given filter, newest first (``contributor``: an accepted client id)."""
        ids = self.catalog.query_ids(
            round=round, contributor=contributor, method=method, kind=kind, limit=None
        )
        if alias is not None:
            target = self.catalog.alias(alias)
            ids = [i for i in ids if i == target]
        return [self.get(v) for v in (ids if limit is None else ids[:limit])]

    def aliases(self) -> dict[str, str]:
        """Alias → version id."""
        return self.catalog.aliases()

    def aliases_of(self, vid: str) -> builtins.list[str]:
        return sorted(a for a, v in self.catalog.aliases().items() if v == vid)

    # -- lineage and diff ------------------------------------------------------------------------

    def lineage(self, ref: str) -> Lineage:
        """Every ancestor of the version (all parents, not only the first) and its parent edges."""
        start = self.get(ref)
        graph: dict[str, tuple[str, ...]] = {}
        todo = [start.id]
        while todo:
            vid = todo.pop()
            if vid in graph:
                continue
            graph[vid] = self.get(vid).parents
            todo.extend(graph[vid])
        return Lineage(version=start.id, parents=graph)

    def diff(self, a: str, b: str) -> Diff:
        """Per-tensor ‖θ_b − θ_a‖₂ of the materialised weights, streamed tensor by tensor (fp64 norms)."""
        va, vb = self.get(a), self.get(b)
        sa, sb = self.materialized_specs(va), self.materialized_specs(vb)
        if [(s.name, s.shape) for s in sa] != [(s.name, s.shape) for s in sb]:
            raise IncompatibleDeltasError(
                f"versions {va.id} and {vb.id} have different tensor names or shapes (bases "
                f"{self.root_of(va).id} and {self.root_of(vb).id}); diff compares versions of one model"
            )
        out: list[TensorDiff] = []
        for (name, ta), (_, tb) in zip(self.iter_materialized(va), self.iter_materialized(vb), strict=True):
            xa, xb = ta.to(torch.float64), tb.to(torch.float64)
            out.append(TensorDiff(name, float(xa.norm()), float(xb.norm()), float((xb - xa).norm())))
        return Diff(a=va.id, b=vb.id, tensors=out)

    # -- aliases ---------------------------------------------------------------------------------

    def set_alias(self, name: str, ref: str) -> str | None:
        """Point alias ``name`` at the version ``ref`` names; return its previous target (or None)."""
        check_alias_name(name)
        vid = self.resolve(ref)
        with self.catalog.write() as conn:
            return self.catalog.move_alias(conn, name, vid, "set", utc_now())

    def rollback(self, alias: str, to: str | None = None) -> str:
        """Move ``alias`` back; return the version it now names. Nothing is deleted.

        With ``to``, the alias moves there (it must be committed). Without, the alias's most recent
        not-yet-undone move is undone (a stack: ``prod`` v3 → v7 → v9, rollback → v7, rollback → v3).
        """
        check_alias_name(alias)
        if self.catalog.alias(alias) is None:
            raise UnknownVersionError(f"alias {alias!r} does not exist; nothing to roll back")
        if to is not None:
            vid = self.resolve(to)
            with self.catalog.write() as conn:
                self.catalog.move_alias(conn, alias, vid, "rollback", utc_now())
            return vid
        with self.catalog.write() as conn:
            move = self.catalog.last_undoable_move(conn, alias)
            if move is None or move.previous is None:
                raise ConfigError(
                    f"alias {alias!r} has no earlier target to roll back to; pass an explicit version "
                    "with to="
                )
            self.catalog.mark_undone(conn, move.seq)
            self.catalog.move_alias(conn, alias, move.previous, "rollback", utc_now())
            return move.previous

    # -- export, verify, gc ----------------------------------------------------------------------

    def export(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        format: str = "safetensors",
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        rank: int | None = None,
    ) -> ExportResult:
        """Export version ``ref``: ``"safetensors"`` (full weights, HF sharded layout, the root's
        files, a model card) or ``"peft"`` (θ_version − θ_root as a LoRA adapter: exact rank by
        default, ``rank`` truncates; see :func:`fedmerge.store.export.export_peft`).
        """
        if format == "safetensors":
            return export_safetensors(self, ref, out_dir, max_shard_bytes=max_shard_bytes)
        if format == "peft":
            from fedmerge.store.export import export_peft

            return export_peft(self, ref, out_dir, rank=rank)
        raise ConfigError(f"export format {format!r} is unknown; use 'safetensors' or 'peft'")

    def verify(self) -> VerifyReport:
        """Re-hash every blob and re-check every version (see :mod:`fedmerge.store.verify`)."""
        return verify_store(self)

    def gc(self, grace_seconds: float = 3600.0, *, dry_run: bool = False) -> GcReport:
        """Remove unreferenced blobs and leftovers older than ``grace_seconds`` (see :mod:`.gc`)."""
        return gc_store(self, grace_seconds, dry_run=dry_run)
