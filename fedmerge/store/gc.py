"""``gc``: remove what no committed version references, once it is older than a grace period.

Removed: blobs no catalog row references, leftover temporary files in ``tmp/`` and manifests no
catalog row points to (interrupted commits). Each only when its modification time is at least
``grace_seconds`` old, so a commit in progress (whose blobs are fresh, and whose reused blobs get
their time refreshed) is never robbed. The sweep runs inside the catalog's writer lock, and a
commit re-checks its blobs inside that same lock, so a version never references a removed blob.
Referenced blobs, manifests of committed versions and foreign files are never touched.

On object storage (:class:`~fedmerge.store.s3.S3BlobBackend`) every age is the object store's own:
its clock (the HTTP ``Date`` of the listing that found the object) minus the object's
``LastModified`` or the upload's ``Initiated`` — never this machine's clock, so a skewed gc host
cannot make a fresh object look old. Besides blobs (a reused blob is not touched: the commit's
re-check inside the writer lock uploads it again if gc removed it; see :mod:`fedmerge.store.s3`):

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
        committed = {r.id for r in store.catalog.rows()}
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
