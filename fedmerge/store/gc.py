"""``gc``: remove what no committed version references, once it is older than a grace period.

Removed: blobs no catalog row references, leftover temporary files in ``tmp/`` and manifests no
catalog row points to (interrupted commits). Each only when its modification time is at least
``grace_seconds`` old, so a commit in progress (whose blobs are fresh, and whose reused blobs get
their time refreshed) is never robbed. The sweep runs inside the catalog's writer lock, and a
commit re-checks its blobs inside that same lock, so a version never references a removed blob.
Referenced blobs, manifests of committed versions and foreign files are never touched.

On object storage (:class:`~fedmerge.store.s3.S3BlobBackend`) a blob's age is its ``LastModified``
(a reused blob is not touched: the commit's re-check inside the writer lock uploads it again if gc
removed it; see :mod:`fedmerge.store.s3`), and multipart uploads that a crashed writer left
incomplete (never visible) are aborted once they are older than the grace period.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedmerge.errors import ConfigError
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.verify import MANIFEST_NAME

if TYPE_CHECKING:
    from fedmerge.store.reader import StoreReader


@dataclass
class GcReport:
    removed_blobs: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_young: int = 0  # unreferenced but inside the grace period
    dry_run: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "removed_blobs": self.removed_blobs,
            "removed_files": self.removed_files,
            "freed_bytes": self.freed_bytes,
            "kept_young": self.kept_young,
            "dry_run": self.dry_run,
        }


def gc(store: StoreReader, grace_seconds: float, *, dry_run: bool = False) -> GcReport:
    """Remove unreferenced blobs and leftovers older than ``grace_seconds`` (see the module docstring)."""
    if grace_seconds < 0:
        raise ConfigError(f"grace_seconds is {grace_seconds}; pass a non-negative number of seconds")
    report = GcReport(dry_run=dry_run)
    with store.catalog.write():
        now = time.time()
        referenced = store.catalog.referenced_blobs()
        committed = {r.id for r in store.catalog.rows()}
        for digest in list(store.blobs.digests()):
            if digest in referenced:
                continue
            if now - store.blobs.mtime(digest) < grace_seconds:
                report.kept_young += 1
                continue
            report.freed_bytes += store.blobs.size(digest)
            report.removed_blobs.append(digest)
            if not dry_run:
                store.blobs.delete(digest)
        candidates = [
            p for p in store.manifest_dir.iterdir() if MANIFEST_NAME.match(p.name) and p.stem not in committed
        ] + store.blobs.leftover_tmp()
        for path in sorted(candidates):
            stat = path.stat()
            if now - stat.st_mtime < grace_seconds:
                report.kept_young += 1
                continue
            report.freed_bytes += stat.st_size
            report.removed_files.append(str(path))
            if not dry_run:
                path.unlink()
        if isinstance(store.blobs, S3BlobBackend):
            for key, upload_id in store.blobs.incomplete_uploads(grace_seconds):
                report.removed_files.append(f"s3://{store.blobs.loc.bucket}/{key} (upload {upload_id})")
                if not dry_run:
                    store.blobs.abort_upload(key, upload_id)
        if not dry_run:
            store.blobs.sync()
    return report
