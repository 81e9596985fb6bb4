"""``verify``: re-hash every blob and re-check every committed version; report, never repair.

Checks, in order:

1. layout: every entry of the store directory is one the store writes (``store.json``, the catalog
   and its ``-wal``/``-shm``/``-journal`` files, ``blobs/``, ``manifests/``, ``tmp/``); manifests are
   named ``v<digits>.json``; blob files ``<aa>/<sha256>.safetensors``. Anything else is *foreign*.
2. blobs: each blob's bytes must hash to its name.
3. versions: for each catalog row, the manifest exists, hashes to what the catalog recorded, parses,
   its content hash recomputes, its parents are committed with the recorded content hashes, and
   every tensor's blob exists, is intact and holds the dtype and shape the manifest says.
4. aliases point at committed versions.

Leftovers of interrupted commits (files in ``tmp/``, manifests no catalog row points to) are
listed separately: they are invisible, harmless and removed by ``gc``; they are not problems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedmerge.errors import StoreIntegrityError
from fedmerge.store.blobs import BLOB_KEY, read_blob_header
from fedmerge.store.errors import CorruptBlobError, ForeignFileError, MissingBlobError
from fedmerge.store.safetensors_format import SafetensorsFormatError, dtype_name

if TYPE_CHECKING:
    from fedmerge.store.reader import StoreReader

_ERROR_OF_KIND: dict[str, type[StoreIntegrityError]] = {
    "corrupt_blob": CorruptBlobError,
    "missing_blob": MissingBlobError,
    "foreign_file": ForeignFileError,
}
MANIFEST_NAME = re.compile(r"^v\d{6,}\.json$")
_TOP_LEVEL = {"store.json", "blobs", "manifests", "tmp", "evaluations"}  # evaluations: store/evaluations.py
_CATALOG_FILES = {
    "catalog.sqlite",
    "catalog.sqlite-wal",
    "catalog.sqlite-shm",
    "catalog.sqlite-journal",
    "catalog.postgresql",  # where the catalog is shared (fedmerge.store.catalogs.SHARED_MARKER)
}


@dataclass(frozen=True)
class Problem:
    """One integrity problem: what kind, which version and tensor (when known), which file."""

    kind: str  # foreign_file | corrupt_blob | missing_blob | bad_manifest | bad_parent | bad_alias
    message: str
    version: str | None = None
    tensor: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "version": self.version,
            "tensor": self.tensor,
            "path": self.path,
            "message": self.message,
        }


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` when there are no problems (leftovers are fine)."""

    versions_checked: int = 0
    blobs_checked: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise :class:`StoreIntegrityError` listing every problem (version and tensor named).

        The subclass follows the first problem (:class:`CorruptBlobError`, :class:`MissingBlobError`,
        :class:`ForeignFileError`, else :class:`StoreIntegrityError` itself).
        """
        if self.problems:
            lines = "\n".join(f"  - {p.message}" for p in self.problems)
            error = _ERROR_OF_KIND.get(self.problems[0].kind, StoreIntegrityError)
            raise error(
                f"store verification found {len(self.problems)} problem(s); "
                f"nothing was repaired or deleted:\n"
                f"{lines}"
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "versions_checked": self.versions_checked,
            "blobs_checked": self.blobs_checked,
            "bytes_hashed": self.bytes_hashed,
            "problems": [p.to_dict() for p in self.problems],
            "leftovers": self.leftovers,
        }


def _check_layout(store: StoreReader, committed: set[str], report: VerifyReport) -> None:
    for path in sorted(store.root.iterdir()):
        if path.name in _CATALOG_FILES or (
            path.name in _TOP_LEVEL and path.is_dir() == (path.name != "store.json")
        ):
            continue
        report.problems.append(
            Problem(
                "foreign_file",
                f"foreign file {path} in the store directory: the store did not write it; move it out",
                path=str(path),
            )
        )
    for path in sorted(store.manifest_dir.iterdir()):
        if not MANIFEST_NAME.match(path.name) or not path.is_file():
            report.problems.append(
                Problem(
                    "foreign_file",
                    f"foreign file {path} among the manifests: not a manifest name; move it out",
                    path=str(path),
                )
            )
        elif path.stem not in committed:
            report.leftovers.append(str(path))
    for stray in store.blobs.stray_paths():
        report.problems.append(
            Problem(
                "foreign_file",
                f"foreign file {stray} among the blobs: not a <sha256>.safetensors blob name; move it out",
                path=str(stray),
            )
        )
    report.leftovers.extend(str(p) for p in store.blobs.leftover_tmp())


def _hash_blobs(store: StoreReader, report: VerifyReport) -> dict[str, bool]:
    """Digest → intact, for every stored blob."""
    intact: dict[str, bool] = {}
    for digest in store.blobs.digests():
        actual, size = store.blobs.hash_blob(digest)  # from the backend itself (not a cache)
        intact[digest] = actual == digest
        report.blobs_checked += 1
        report.bytes_hashed += size
    return intact


def verify(store: StoreReader) -> VerifyReport:
    """Check the whole store (see the module docstring); return a report, raise nothing for problems."""
    report = VerifyReport()
    rows = store.catalog.rows()
    committed = {r.id for r in rows}
    _check_layout(store, committed, report)
    intact = _hash_blobs(store, report)

    content_hash = {r.id: r.content_hash for r in rows}
    for row in rows:
        report.versions_checked += 1
        try:
            version = store.read_manifest(row)
        except StoreIntegrityError as exc:
            report.problems.append(Problem("bad_manifest", str(exc), version=row.id))
            continue
        for parent, recorded in zip(version.parents, version.parent_hashes, strict=True):
            if content_hash.get(parent) != recorded:
                report.problems.append(
                    Problem(
                        "bad_parent",
                        f"version {row.id}: parent {parent} is not committed with content hash {recorded}",
                        version=row.id,
                    )
                )
        for part, entries in (("tensor", version.tensors), ("state", version.state), ("file", version.files)):
            for name, entry in sorted(entries.items()):
                path = store.blobs.describe(entry.blob)
                if entry.blob not in intact:
                    report.problems.append(
                        Problem(
                            "missing_blob",
                            f"version {row.id} {part} {name!r}: blob {entry.blob} is missing ({path}); "
                            "restore it from a backup",
                            version=row.id,
                            tensor=name,
                            path=str(path),
                        )
                    )
                elif not intact[entry.blob]:
                    report.problems.append(
                        Problem(
                            "corrupt_blob",
                            f"version {row.id} {part} {name!r}: blob {entry.blob} is corrupted (its bytes no "
                            f"longer hash to its name; {path}); restore it from a backup",
                            version=row.id,
                            tensor=name,
                            path=str(path),
                        )
                    )
                else:
                    _check_blob_header(
                        store, entry.blob, entry.dtype, entry.shape, row.id, part, name, report
                    )
    _check_aliases(store, committed, report)
    return report


def _check_blob_header(
    store: StoreReader,
    digest: str,
    dtype: str,
    shape: tuple[int, ...],
    vid: str,
    part: str,
    name: str,
    report: VerifyReport,
) -> None:
    path = store.blobs.describe(digest)
    try:
        header = read_blob_header(store.blobs, digest, what=f"version {vid} {part} {name!r}")
        spec = header.entries[BLOB_KEY][0]
        ok = dtype_name(spec.dtype) == dtype and spec.shape == shape
        detail = f"holds {dtype_name(spec.dtype)}{list(spec.shape)}"
    except (SafetensorsFormatError, KeyError) as exc:
        ok, detail = False, f"is not a valid tensor blob ({exc})"
    if not ok:
        report.problems.append(
            Problem(
                "corrupt_blob",
                f"version {vid} {part} {name!r}: blob {digest} {detail} but the manifest says "
                f"{dtype}{list(shape)}",
                version=vid,
                tensor=name,
                path=str(path),
            )
        )


def _check_aliases(store: StoreReader, committed: set[str], report: VerifyReport) -> None:
    for alias, vid in store.catalog.aliases().items():
        if vid not in committed:
            report.problems.append(
                Problem("bad_alias", f"alias {alias!r} points at {vid}, which is not committed", version=vid)
            )
