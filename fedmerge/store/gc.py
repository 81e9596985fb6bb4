"""``gc``: remove what no committed version references, once it is older than a grace period.

Removed: blobs no catalog row references, leftover temporary files in ``tmp/`` and manifests no
catalog row points to (interrupted commits; on object storage their copy in the bucket too). Each
only when its modification time is at least ``grace_seconds`` old, so a commit in progress (whose
blobs are fresh, and whose reused blobs get their time refreshed) is never robbed. The sweep runs
inside the catalog's writer lock, and a commit re-checks its blobs inside that same lock, so a
version never references a removed blob. Referenced blobs, manifests of committed versions and
foreign files are never touched.

On object storage (:class:`~fedmerge.store.s3.S3BlobBackend`) every age is the object store's own:
its clock (the HTTP ``Date`` of the listing that found the object) minus the object's
``LastModified`` or the upload's ``Initiated`` — never this machine's clock, so a skewed gc host
cannot make a fresh object look old. Besides blobs (a reused blob is not touched: the commit's
re-check inside the writer lock uploads it again if gc removed it; see :mod:`fedmerge.store.s3`):

* **An interrupted commit's manifest copy** (``manifests/v….json`` with no catalog row: a commit
  puts the copy just before it inserts its row, both inside the writer lock, and died between
  them) is deleted once its ``LastModified`` is at least ``grace_seconds`` old. gc decides inside
  the writer lock, so no commit is between those two steps then; a copy whose row exists is never
  touched. Only the copy after the catalog's latest version can be such a leftover (the next commit
  takes that number and overwrites it): any other uncatalogued copy means the catalog is not the
  one that wrote the bucket, and gc refuses before removing anything — with the wrong catalog every
  blob would look unreferenced.
* **Incomplete multipart uploads** under ``blobs/`` and the intake's spool (never visible; a crashed
  writer leaves them) are aborted once initiated at least ``grace_seconds`` ago. A writer still
  uploading parts is younger than that — keep the grace period longer than the slowest upload.
* **The intake's spool** (``intake/spool/<sha256>``, the bytes ``serve-continual`` replicas keep for
  acknowledged experts): an object is deleted only when no submission in state ``queued`` (waiting
  or being merged) has its sha256 and its ``LastModified`` is at least ``grace_seconds`` old. The
  references are read from the replicas' queue table in the PostgreSQL catalog's database, under a
  ``SHARE`` lock on that table held until the sweep ends, so no submission can be acknowledged while
  gc decides and deletes; a replica that acknowledges one after the sweep checks that its object is
  still there and uploads it again if gc removed it (a replica whose conditional upload found an old
  copy left by a replica that died before acknowledging). Without a PostgreSQL catalog holding that
  table there is no shared spool, and the spool is not touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedmerge.errors import ConfigError
from fedmerge.store.catalog import VersionRow
from fedmerge.store.errors import StoreIntegrityError
from fedmerge.store.pg_catalog import PgCatalog
from fedmerge.store.s3 import INTAKE_SPOOL, S3BlobBackend
from fedmerge.store.verify import MANIFEST_NAME

if TYPE_CHECKING:
    from fedmerge.store.reader import StoreReader

QUEUE_TABLE = "submissions"
"""The replicas' queue table (:data:`fedmerge.service.intake.SCHEMA`): ``sha256``, ``state``."""


@dataclass
class GcReport:
    removed_blobs: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)  # incl. aborted uploads (key, upload id)
    removed_spool: list[str] = field(default_factory=list)  # s3://… of the intake's spool objects
    freed_bytes: int = 0
    kept_young: int = 0  # unreferenced but inside the grace period
    dry_run: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "removed_blobs": self.removed_blobs,
            "removed_files": self.removed_files,
            "removed_spool": self.removed_spool,
            "freed_bytes": self.freed_bytes,
            "kept_young": self.kept_young,
            "dry_run": self.dry_run,
        }


def gc(store: StoreReader, grace_seconds: float, *, dry_run: bool = False) -> GcReport:
    """Remove unreferenced blobs and leftovers older than ``grace_seconds`` (see the module docstring)."""
    if grace_seconds < 0:
        raise ConfigError(f"grace_seconds is {grace_seconds}; pass a non-negative number of seconds")
    report = GcReport(dry_run=dry_run)
    blobs = store.blobs
    with store.catalog.write() as conn:
        now = time.time()
        referenced = store.catalog.referenced_blobs()
        rows = store.catalog.rows()
        committed = {r.id for r in rows}
        # checked before anything is removed: a catalog that is not the bucket's would free every blob
        copies = _orphan_manifest_copies(blobs, rows) if isinstance(blobs, S3BlobBackend) else None
        listed = list(blobs.digests())
        blob_now = blobs.listed_at if isinstance(blobs, S3BlobBackend) else now
        for digest in listed:
            if digest in referenced:
                continue
            if blob_now - blobs.mtime(digest) < grace_seconds:
                report.kept_young += 1
                continue
            report.freed_bytes += blobs.size(digest)
            report.removed_blobs.append(digest)
            if not dry_run:
                blobs.delete(digest)
        candidates = [
            p for p in store.manifest_dir.iterdir() if MANIFEST_NAME.match(p.name) and p.stem not in committed
        ] + blobs.leftover_tmp()
        for path in sorted(candidates):
            stat = path.stat()
            if now - stat.st_mtime < grace_seconds:
                report.kept_young += 1
                continue
            report.freed_bytes += stat.st_size
            report.removed_files.append(str(path))
            if not dry_run:
                path.unlink()
        if isinstance(blobs, S3BlobBackend):
            orphans, server_now = copies or ([], 0.0)
            for name, size, modified in orphans:
                if server_now - modified < grace_seconds:
                    report.kept_young += 1
                    continue
                report.freed_bytes += size
                report.removed_files.append(blobs.manifest_url(name))
                if not dry_run:
                    blobs.delete_manifest(name)
            old, young = blobs.incomplete_uploads(grace_seconds)
            report.kept_young += young
            for key, upload_id in old:
                report.removed_files.append(f"s3://{blobs.loc.bucket}/{key} (upload {upload_id})")
                if not dry_run:
                    blobs.abort_upload(key, upload_id)
            if isinstance(store.catalog, PgCatalog):
                _sweep_spool(conn, blobs, grace_seconds, report)
        if not dry_run:
            blobs.sync()
    return report


def _orphan_manifest_copies(
    blobs: S3BlobBackend, rows: list[VersionRow]
) -> tuple[list[tuple[str, int, float]], float]:
    """((name, size, LastModified) of the manifest copies in the bucket that no catalog row names, the
    object store's clock at the listing); objects under ``manifests/`` not named like a manifest are
    not the store's and are left alone.

    A commit puts its manifest's copy just before it inserts its row, both inside the writer lock,
    and the next commit takes the same sequence number and overwrites the copy, so the only copy an
    interrupted commit can leave is the one after the catalog's latest version. Anything else means
    this catalog is not the one that wrote the bucket (its blobs would all look unreferenced):
    :class:`StoreIntegrityError`, and nothing is removed."""
    copies, server_now = blobs.manifest_copies()
    named = {f"{row.id}.json" for row in rows}
    orphans = [c for c in copies if MANIFEST_NAME.match(c[0]) and c[0] not in named]
    latest = max((row.seq for row in rows), default=0)
    if orphans and [int(name[1:-5]) for name, _, _ in orphans] != [latest + 1]:
        shown = ", ".join(name for name, _, _ in orphans[:4]) + (", …" if len(orphans) > 4 else "")
        raise StoreIntegrityError(
            f"gc refused, nothing removed: {blobs.manifest_url('')} holds {len(orphans)} manifest "
            f"cop{'y' if len(orphans) == 1 else 'ies'} this catalog has no version for ({shown}), while an "
            f"interrupted commit leaves at most v{latest + 1:06d}.json: the catalog is not the one that "
            "wrote this bucket — pass the store's catalog (--catalog postgresql://… or FEDMERGE_CATALOG, or "
            "the cache directory holding its SQLite catalog)"
        )
    return orphans, server_now


def _sweep_spool(conn: Any, blobs: S3BlobBackend, grace_seconds: float, report: GcReport) -> None:
    """Delete the intake's spool objects no queued submission references (module docstring). ``conn``
    is the PostgreSQL catalog's write transaction: its end releases the queue table's lock."""
    (exists,) = conn.execute("SELECT to_regclass(?) IS NOT NULL", (QUEUE_TABLE,)).fetchone()
    if not exists:
        return
    conn.execute(f"LOCK TABLE {QUEUE_TABLE} IN SHARE MODE")
    rows = conn.execute(f"SELECT sha256 FROM {QUEUE_TABLE} WHERE state = 'queued'").fetchall()
    queued = {str(row[0]) for row in rows}
    objects, server_now = blobs.spool_objects()
    for sha, size, modified in objects:
        if sha in queued:
            continue
        if server_now - modified < grace_seconds:
            report.kept_young += 1
            continue
        report.freed_bytes += size
        report.removed_spool.append(f"s3://{blobs.loc.bucket}/{blobs.loc.key(INTAKE_SPOOL, sha)}")
        if not report.dry_run:
            blobs.delete_object(f"{INTAKE_SPOOL}/{sha}")
