"""Several ``serve-continual`` replicas on one store: a shared queue and a lease per track in PostgreSQL.

With ``--catalog postgresql://…`` every replica keeps the store's catalog, the intake queue and the
track leases in that one database. The submitted bytes (the spool) live where the blobs do: with an
``s3://bucket/prefix`` store, in the bucket under ``<prefix>/intake/spool/<sha256>`` (each replica's
``--data-dir`` is then its own local scratch: partial uploads, bulk objects, a cache of the spool),
so the replicas share nothing but the object store and the database; with a directory store, in a
``--data-dir`` all replicas share (a shared filesystem).

* **Acknowledged = durable in the shared queue.** :class:`SharedIntakeQueue` is the
  :class:`~fedmerge.service.intake.IntakeQueue` with its table in PostgreSQL: the spool file is
  fsynced and renamed (and, on an object store, uploaded: durable there once the upload completes;
  a replica merging an expert it did not receive downloads it and checks its sha256), then the row
  is inserted (autocommit, so durable when the ``INSERT``
  returns), and only then is the submission id returned. A replica that dies before that never
  acknowledged; a client retries at another replica and the same bytes map to the same id.
* **One merger per track at a time.** :class:`TrackLease` is a row ``leases(track, holder, token,
  expires_at)``. A replica takes it only when it is free or expired — by the database's clock
  (``now()``), so the replicas' own clocks never matter — and each takeover increments ``token``.
  The holder renews it before every merge step. Its store's catalog is fenced with ``(track,
  holder, token)`` (:meth:`~fedmerge.store.pg_catalog.PgCatalog.set_fence`): a commit whose lease
  expired while it merged, or was taken over, is refused inside the commit's own transaction, so a
  paused or partitioned replica never commits behind the new holder's back.
* **Takeover after a death.** A SIGKILLed holder stops renewing; after ``ttl`` another replica takes
  the lease, rebuilds the merger from the track's head (its committed state) and reconciles the
  queue: rows already among the head's contributors are marked merged, not merged again
  (:meth:`~fedmerge.service.worker.MergeWorker.recover`). Experts are taken in queue order (``seq``).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fedmerge.aggregators.continual import create_continual
from fedmerge.errors import InvalidSubmission
from fedmerge.service.bulk import check_sha
from fedmerge.service.config import Limits
from fedmerge.service.intake import SCHEMA, IntakeQueue, Submission
from fedmerge.store.errors import CorruptBlobError, MissingBlobError
from fedmerge.store.pg_catalog import SCHEMA_LOCK as _SCHEMA_LOCK
from fedmerge.store.pg_catalog import LeaseLostError, PgCatalog, PgConnection, pg_schema
from fedmerge.store.s3 import INTAKE_SPOOL, S3BlobBackend

log = logging.getLogger(__name__)

QUEUE_SCHEMA = pg_schema(SCHEMA)
"""The intake queue's table in PostgreSQL: :data:`fedmerge.service.intake.SCHEMA` in its dialect."""

STALE_PARTIAL_S = 3600.0
"""A replica's unfinished upload untouched this long (its replica died) is removed at start-up."""


SPOOL_PREFIX = INTAKE_SPOOL
"""Where, under an ``s3://bucket/prefix`` store, the replicas keep the acknowledged experts' bytes
(``gc`` sweeps it: :mod:`fedmerge.store.gc`)."""


def spool_object(sha256: str) -> str:
    """The object name (under the store's prefix) of the spooled expert whose bytes hash to ``sha256``."""
    return f"{SPOOL_PREFIX}/{check_sha(sha256)}"


class SpoolObjectLost(InvalidSubmission):
    """An acknowledged expert's bytes are missing from the object store or no longer match their
    sha256 (something outside fedmerge changed the bucket): the expert is rejected with this reason."""


def replica_id() -> str:
    """A name unique to this process: host, pid and a random suffix (a restarted replica is new)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class SharedIntakeQueue(IntakeQueue):
    """The intake queue with its table in PostgreSQL, shared by every replica (module docstring).

    The spool under ``root`` must be the same directory for every replica; each replica writes its
    partial uploads under ``spool/tmp/<replica>/`` so that one replica starting never removes
    another's upload in progress."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        url: str,
        limits: Limits = Limits(),  # noqa: B008
        *,
        objects: S3BlobBackend | None = None,
    ) -> None:
        self.root = Path(root)
        self.objects = objects
        self.spool = self.root / "spool"
        self.replica = replica_id()
        self.tmp = self.spool / "tmp" / self.replica
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self._lock = threading.RLock()  # type: ignore[assignment]
        self._arrived = threading.Condition()
        self._pg = PgConnection(url)
        self._conn = self._pg  # type: ignore[assignment]  # IntakeQueue's SQL runs on it unchanged
        with self._pg.transaction(lock_key=_SCHEMA_LOCK):
            for statement in QUEUE_SCHEMA.split(";"):
                if statement.strip():
                    self._pg.execute(statement)
        self._remove_stale_partials()

    def _remove_stale_partials(self) -> None:
        cutoff = time.time() - STALE_PARTIAL_S
        for folder in (self.spool / "tmp").iterdir():
            for stale in folder.iterdir() if folder.is_dir() else ():
                try:
                    if stale.stat().st_mtime < cutoff:
                        stale.unlink()
                except OSError:
                    continue

    def _enqueue(
        self, sha: str, client_id: str, fmt: str, base_version: str, label: str, size: int
    ) -> tuple[Submission, bool]:
        """With ``objects``: the spooled bytes go to the object store before the row is inserted, so
        an acknowledged expert is durable where every replica can read it. ``gc`` may delete the
        object before the row is in (an old copy the conditional upload found, or any with a zero
        grace period); gc holds the queue table until its sweep ends, so once the row is in the
        object is checked and uploaded again if it is gone (:mod:`fedmerge.store.gc`)."""
        if self.objects is None:
            return super()._enqueue(sha, client_id, fmt, base_version, label, size)
        name = spool_object(sha)
        self.objects.put_file(name, self.spool_path(sha))
        sub, duplicate = super()._enqueue(sha, client_id, fmt, base_version, label, size)
        if not duplicate and not self.objects.has_object(name):
            self.objects.put_file(name, self.spool_path(sha))
        return sub, duplicate

    def spooled(self, sub: Submission) -> Path:
        """The local spool file of ``sub``; with ``objects``, fetched from the object store (its
        sha256 checked) when this replica has not seen the bytes yet."""
        local = self.spool_path(sub)
        if self.objects is None or local.is_file():
            return local
        sha = sub.sha256
        try:
            self.objects.fetch_file(spool_object(sha), local, sha)
        except (CorruptBlobError, MissingBlobError) as exc:  # the expert's bytes are gone: its failure
            raise SpoolObjectLost(
                f"the spooled expert {sha[:12]}… cannot be read back from the object store: {exc}; "
                "submit it again"
            ) from None
        return local

    def close(self) -> None:
        with self._lock:
            self._pg.close()
        with suppress(OSError):
            self.tmp.rmdir()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._pg.transaction():
            yield


class TrackLease:
    """The lease on one continual track (see the module docstring). Not thread-safe: one worker."""

    def __init__(self, url: str, track: str, *, ttl_s: float = 15.0, holder: str | None = None) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl_s!r}")
        self.track = track
        self.ttl_s = float(ttl_s)
        self.holder = holder or replica_id()
        self.token: int | None = None
        self._pg = PgConnection(url)
        with self._pg.transaction(lock_key=_SCHEMA_LOCK):
            self._pg.execute(
                "CREATE TABLE IF NOT EXISTS leases (track TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                "token BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL)"
            )

    def acquire(self) -> bool:
        """Take the lease if it is free or expired (or renew it if held); True when held now."""
        if self.token is not None:
            return self.renew()
        found = self._pg.execute(
            "INSERT INTO leases (track, holder, token, expires_at) "
            "VALUES (?, ?, 1, now() + make_interval(secs => ?)) "
            "ON CONFLICT (track) DO UPDATE SET holder = excluded.holder, token = leases.token + 1, "
            "expires_at = excluded.expires_at WHERE leases.expires_at <= now() "
            "RETURNING token",
            (self.track, self.holder, self.ttl_s),
        ).fetchone()
        self.token = None if found is None else int(found[0])
        return self.token is not None

    def renew(self) -> bool:
        """Extend the held lease by ``ttl``; False (and no longer held) if it expired or was taken."""
        if self.token is None:
            return False
        found = self._pg.execute(
            "UPDATE leases SET expires_at = now() + make_interval(secs => ?) "
            "WHERE track = ? AND holder = ? AND token = ? AND expires_at > now() RETURNING token",
            (self.ttl_s, self.track, self.holder, self.token),
        ).fetchone()
        if found is None:
            log.warning("lease on track %r (token %s) was lost", self.track, self.token)
            self.token = None
        return self.token is not None

    def release(self) -> None:
        """Give the lease up now (it expires at once), so another replica need not wait ``ttl``."""
        if self.token is None:
            return
        self._pg.execute(
            "UPDATE leases SET expires_at = now() WHERE track = ? AND holder = ? AND token = ?",
            (self.track, self.holder, self.token),
        )
        self.token = None

    def holder_now(self) -> tuple[str, int, bool] | None:
        """(holder, token, unexpired) of the track's lease row, or None."""
        found = self._pg.execute(
            "SELECT holder, token, expires_at > now() FROM leases WHERE track = ?", (self.track,)
        ).fetchone()
        return None if found is None else (str(found[0]), int(found[1]), bool(found[2]))

    def close(self) -> None:
        self._pg.close()


def run_leased(
    worker: object,
    lease: TrackLease,
    stop: threading.Event,
    *,
    idle_wait: float = 0.5,
    max_backoff: float = 30.0,
) -> None:
    """:meth:`MergeWorker.run` for one replica of several: merge only while holding ``lease``.

    Each pass renews (or tries to take) the lease; on taking it the worker's store catalog is fenced
    with the new token and the merger is rebuilt from the track's head. A failure (the database
    restarted, the lease lost at commit) is logged, the worker backs off (1 s doubling up to
    ``max_backoff``) and rebuilds from the head again. The lease is released when ``stop`` is set."""
    from fedmerge.service.worker import MergeWorker

    assert isinstance(worker, MergeWorker)
    catalog = worker.store.catalog
    if not isinstance(catalog, PgCatalog):
        raise TypeError("run_leased needs a store opened on a postgresql:// catalog")
    backoff = 0.0
    fresh = True  # the merger must be rebuilt from the head before the next step
    try:
        while not stop.is_set():
            try:
                held_before = lease.token
                if not lease.acquire():
                    catalog.clear_fence()
                    fresh = True
                    worker.queue.wait(min(idle_wait, lease.ttl_s / 3))
                    continue
                if lease.token != held_before or fresh:
                    catalog.set_fence(lease.track, lease.holder, int(lease.token or 0))
                    worker.merger = create_continual(worker.method, **worker.params)
                    worker.head = None
                    worker.recover()
                    fresh = False
                    log.info("holding the lease on %r (token %s)", lease.track, lease.token)
                if worker.step() is None and not worker.queue.queued(1):
                    worker.queue.wait(min(idle_wait, lease.ttl_s / 3))
                backoff = 0.0
            except Exception as exc:  # a store/queue failure or a lost lease: rebuild from the head
                if isinstance(exc, LeaseLostError):
                    lease.token = None
                    log.warning("%s", exc)
                else:
                    log.exception("merge step failed; resuming from the track head")
                worker.error = exc
                fresh = True
                backoff = min(max(1.0, 2 * backoff), max_backoff)
                stop.wait(backoff)
    finally:
        try:
            lease.release()
        except Exception:
            log.warning("could not release the lease on %r; it expires in %.0f s", lease.track, lease.ttl_s)
