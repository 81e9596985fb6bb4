"""``ModelStore``: the facade over blobs, manifests and the catalog.

Layout of a store directory::

    store.json                      marks the directory as a store; layout format_version
    catalog.sqlite (+ -wal, -shm)   the catalog (which versions exist, aliases); see catalog.py
    manifests/v000012.json          one immutable manifest per version; see manifest.py
    blobs/ab/ab…(64 hex).safetensors one tensor per blob, named by the sha256 of its bytes; see blobs.py
    tmp/                            files being written (temporary names); removed by gc

Commit protocol (each step durable before the next):

1. every tensor is written as a blob (:func:`~fedmerge.store.staging.stage_tensors`, one path for
   a stream of tensors and for a mapping's): temporary files (hashed while written) → one batch of
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

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict, Unpack

import torch

from fedmerge import FORMAT_VERSION
from fedmerge.delta.state_dict import StateDict, check_shapes, shapes_of
from fedmerge.errors import ConfigError, IncompatibleDeltasError, StoreIntegrityError
from fedmerge.store.blobs import BlobBackend, LocalBlobBackend, fsync_dir, write_atomic
from fedmerge.store.catalog import Catalog, VersionRow
from fedmerge.store.catalogs import open_catalog
from fedmerge.store.errors import MissingBlobError, UnknownVersionError
from fedmerge.store.export import DEFAULT_MAX_SHARD_BYTES, ExportResult, export_safetensors
from fedmerge.store.faults import FaultPoints
from fedmerge.store.gc import GcReport
from fedmerge.store.gc import gc as gc_store
from fedmerge.store.manifest import (
    KINDS,
    Contributor,
    Version,
    build_version,
    check_json_value,
    utc_now,
    version_id,
)
from fedmerge.store.reading import Diff, Lineage, StoreReading, TensorDiff, TensorView, sha256_bytes
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_client import is_s3_url
from fedmerge.store.staging import (
    RESERVED_FILE_NAMES,
    Staged,
    check_alias_name,
    check_file_name,
    check_floating,
    check_tensors,
    file_tensor,
    floating_shapes,
    stage_tensors,
)
from fedmerge.store.verify import VerifyReport
from fedmerge.store.verify import verify as verify_store

STORE_MARKER = "store.json"
STORE_LAYOUT = "fedmerge-store"
CATALOG_FILE = "catalog.sqlite"
# tensors of a streamed commit held at once: one being staged (encoded, hashed, written) while the
# stream produces the next, so a tensor-major merge overlaps the commit's writes
STREAM_WORKERS = 2


class DeltaRecord(TypedDict):
    """What a delta version records besides its tensors, as :meth:`ModelStore.commit` takes it
    (``state``: opaque aggregator tensors persisted with the version, e.g. a server optimiser's
    moments or the downlink's residual)."""

    method: str
    params: dict[str, Any]
    contributors: list[Contributor]
    round: int | None
    metrics: dict[str, Any]
    privacy: dict[str, Any] | None
    aliases: NotRequired[Sequence[str]]
    metadata: NotRequired[dict[str, Any] | None]
    state: NotRequired[Mapping[str, torch.Tensor] | None]


class ModelStore(StoreReading):
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
        :func:`~fedmerge.store.s3_client.default_cache_dir`) holds the read-through cache, the manifests
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
        tensors persisted with the version. Returns the committed :class:`Version`. The same path as
        :meth:`commit_stream` (the mapping's tensors streamed into it, checked whole first).
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
        delta: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        *,
        parents: list[str],
        **record: Unpack[DeltaRecord],
    ) -> Version:
        """:meth:`commit` of a task vector given as (name, tensor) pairs, consumed one at a time.

        Each tensor is checked against the base's floating tensors (name, shape, floating dtype) and
        staged as a blob as it arrives, one while ``delta`` produces the next, so memory holds at most
        :data:`STREAM_WORKERS` (two) tensors whatever the model size. The same
        promise as :meth:`commit`: nothing is visible until every blob is durable and the catalog row
        is written; an exception raised by ``delta`` (or by a check) aborts the commit and removes the
        staged blobs, leaving the store as it was. ``record``: the keyword arguments of :meth:`commit`
        but ``kind`` (always ``task_vector``), ``state`` included (:class:`DeltaRecord`). A mapping
        (a merge held in memory) is the small case: checked whole, then its items streamed in.
        """
        if not parents:
            raise ConfigError(
                "a delta needs at least one parent version; commit full weights with commit_base"
            )
        return self._commit(delta, kind="task_vector", parents=list(parents), name=None, **record)

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
            floating = floating_shapes(self.root_of(resolved[0]))
            check_shapes(shapes_of(tensors), floating, what=f"delta for parent {resolved[0].id}")
            for name, t in tensors.items():
                check_floating(name, t)
        return resolved

    def _commit(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        kind: str,
        parents: list[str],
        name: str | None,
        files: Mapping[str, bytes] | None = None,
        **record: Unpack[DeltaRecord],
    ) -> Version:
        """The one way a version is written (module docstring): ``tensors`` streamed into blobs
        (:func:`~fedmerge.store.staging.stage_tensors`), then ``state`` and ``files``, then the
        manifest and the catalog row. A mapping is checked whole before anything is written and its
        blobs' bytes are kept (a blob a concurrent gc removed is rewritten); a stream is checked
        tensor by tensor and holds at most :data:`STREAM_WORKERS` tensors at a time."""
        method, params, round = record["method"], record["params"], record["round"]
        metrics, privacy, contributors = record["metrics"], record["privacy"], list(record["contributors"])
        metadata, aliases = record.get("metadata") or {}, record.get("aliases", ("latest",))
        state = record.get("state") or None
        what = "delta" if kind != "full" else "weights"
        whole = tensors if isinstance(tensors, Mapping) else None
        if whole is not None:
            check_tensors(whole, what)
        if state is not None:
            check_tensors(state, "state")
        for what_, value in (
            ("params", params),
            ("metrics", metrics),
            ("privacy", privacy),
            ("metadata", metadata),
        ):
            check_json_value(value, what_)
        if round is not None and (not isinstance(round, int) or isinstance(round, bool) or round < 0):
            raise ConfigError(f"round is {round!r}; pass a non-negative int or None")
        for c in contributors:
            if not isinstance(c, Contributor):
                raise ConfigError(f"contributors must be Contributor instances, got {type(c).__name__}")
        for alias in aliases:
            check_alias_name(alias)
        parent_versions = self._validate_parents(parents, kind, whole) if parents else []
        root = self.root_of(parent_versions[0]) if parent_versions else None

        def stage(items: Iterable[tuple[str, torch.Tensor]], what: str, memory: bool, **kw: Any) -> Staged:
            # in memory: a thread pool, bytes kept; a stream: bytes not kept, one tensor staged while
            # the stream produces the next (a tensor-major merge runs beside the writes), so at most
            # STREAM_WORKERS tensors are held whatever the stream's length
            return stage_tensors(
                self.blobs, self._faults, items, what=what,
                workers=self.workers if memory else min(STREAM_WORKERS, self.workers), keep=memory, **kw,
            )  # fmt: skip

        delta = stage(
            sorted(whole.items()) if whole is not None else tensors,  # type: ignore[arg-type]
            what,
            whole is not None,
            expected=floating_shapes(root) if root is not None and kind == "task_vector" else None,
            parent=parent_versions[0].id if parent_versions else None,
        )
        staged_state = stage(sorted(state.items()), "state", True) if state else None
        file_tensors = {n: file_tensor(bytes(b)) for n, b in (files or {}).items()}
        staged_files = stage(sorted(file_tensors.items()), "files", True) if file_tensors else None
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
            "tensors": delta.entries,
            "state": staged_state.entries if staged_state else {},
            "method": method,
            "params": params,
            "contributors": tuple(contributors),
            "round": round,
            "metrics": metrics,
            "privacy": privacy,
            "metadata": metadata,
            "files": staged_files.entries if staged_files else {},
        }
        with self.catalog.write() as conn:
            seq = self.catalog.next_sequence(conn)
            vid = version_id(seq)
            version = build_version(vid, utc_now(), **fields)
            rewritten = False
            checked: set[str] = set()
            for staged in (delta, staged_state, staged_files):
                for tname, entry in staged.entries.items() if staged else ():
                    if entry.blob in checked or self.blobs.has(entry.blob):
                        checked.add(entry.blob)
                        continue
                    parts = staged.kept.get(entry.blob)  # type: ignore[union-attr]
                    if parts is None:  # a stream's bytes were not kept: the commit cannot redo it
                        raise MissingBlobError(
                            f"blob of {tname!r} was removed by a concurrent gc before the commit; "
                            "commit again"
                        )
                    self.blobs.put(entry.blob, parts)  # removed by a concurrent gc since step 1
                    checked.add(entry.blob)
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
                manifest_sha256=sha256_bytes(manifest),
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


__all__ = [
    "CATALOG_FILE",
    "RESERVED_FILE_NAMES",
    "STORE_LAYOUT",
    "STORE_MARKER",
    "DeltaRecord",
    "Diff",
    "Lineage",
    "ModelStore",
    "TensorDiff",
    "TensorView",
    "check_alias_name",
    "check_file_name",
    "file_tensor",
]
