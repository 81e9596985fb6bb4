"""The durable intake queue: spool files fsynced before the acknowledgement, a SQLite queue table.

:meth:`IntakeQueue.receive` streams an expert's bytes into ``spool/tmp/``, hashing and counting
them, fsyncs the file, renames it to ``spool/<sha256>`` (fsyncing the directory) and inserts the
queue row in a ``synchronous=FULL`` transaction. Only then is a submission id returned, so an
acknowledged expert survives ``kill -9`` and power loss. The row's ``sha256`` column is unique:
submitting the same bytes again returns the existing submission (``duplicate=True``) and it is
merged once. The queue keeps arrival order (``seq``), the state (queued → merged into a version,
rejected with a reason when the expert is invalid, or failed with a reason when turning it into a
merge failed unexpectedly — a dead letter the worker leaves behind and moves on from), the number of
merge attempts begun, and per-client accounting for quotas.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedmerge.errors import InvalidSubmission
from fedmerge.fsutil import fsync_dir
from fedmerge.service.bulk import BulkStore, check_sha
from fedmerge.service.config import Limits

FORMATS = ("checkpoint", "peft_tar", "delta_package")
STATES = ("queued", "merged", "rejected", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL,
    format TEXT NOT NULL,
    base_version TEXT NOT NULL,
    label TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,
    version TEXT,
    reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS submissions_by_state ON submissions(state, seq);
CREATE INDEX IF NOT EXISTS submissions_by_client ON submissions(client_id, state);
"""


class QuotaExceeded(InvalidSubmission):
    """A per-client limit was reached (retryable once earlier submissions are merged, for ``max_queued``)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnknownSubmissionError(InvalidSubmission, KeyError):
    """No submission has that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Submission:
    seq: int
    id: str
    sha256: str
    client_id: str
    format: str
    base_version: str
    label: str
    size: int
    state: str
    version: str | None
    reason: str | None
    created_at: str
    # how many times the merge worker began merging it (a crash mid-merge leaves it queued, counted)
    attempts: int = 0


_COLUMNS = (
    "seq, id, sha256, client_id, format, base_version, label, size, state, version, reason, created_at, "
    "attempts"
)


def _row(row: tuple[object, ...]) -> Submission:
    seq, sid, sha, client, fmt, base, label, size, state, version, reason, created, attempts = row
    return Submission(
        int(seq),  # type: ignore[call-overload]
        str(sid),
        str(sha),
        str(client),
        str(fmt),
        str(base),
        str(label),
        int(size),  # type: ignore[call-overload]
        str(state),
        None if version is None else str(version),
        None if reason is None else str(reason),
        str(created),
        int(attempts),  # type: ignore[call-overload]
    )


def submission_id(sha256: str) -> str:
    """Submission ids derive from the content hash, so the same bytes always get the same id."""
    return "s-" + sha256[:24]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class IntakeQueue:
    """Spool directory + ``queue.sqlite`` under ``root`` (see the module docstring). Thread-safe."""

    def __init__(self, root: str | os.PathLike[str], limits: Limits = Limits()) -> None:  # noqa: B008
        self.root = Path(root)
        self.spool = self.root / "spool"
        self.tmp = self.spool / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self._lock = threading.Lock()
        self._arrived = threading.Condition()
        self._conn = sqlite3.connect(
            self.root / "queue.sqlite", timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(submissions)")}
        if "attempts" not in columns:  # a queue written before merge attempts were counted
            self._conn.execute("ALTER TABLE submissions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        for stale in self.tmp.iterdir():  # interrupted, never acknowledged
            stale.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------------------ queries
    def _one(self, where: str, args: tuple[object, ...]) -> Submission | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM submissions WHERE {where}", args).fetchone()
        return None if row is None else _row(row)

    def get(self, sid: str) -> Submission:
        sub = self._one("id = ?", (sid,))
        if sub is None:
            raise UnknownSubmissionError(f"no submission {sid!r}; ids are returned by SubmitExpert")
        return sub

    def by_sha(self, sha256: str) -> Submission | None:
        return self._one("sha256 = ?", (sha256,))

    def queued(self, limit: int) -> list[Submission]:
        """The oldest queued submissions, in arrival order."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM submissions WHERE state = 'queued' ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [_row(r) for r in rows]

    def depth(self) -> int:
        """How many acknowledged submissions wait to be merged (state ``queued``)."""
        with self._lock:
            (count,) = self._conn.execute(
                "SELECT COUNT(*) FROM submissions WHERE state = 'queued'"
            ).fetchone()
        return int(count)

    def all(self) -> list[Submission]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM submissions ORDER BY seq").fetchall()
        return [_row(r) for r in rows]

    def spool_path(self, sub: Submission | str) -> Path:
        """Where this server spools the expert's bytes (the file may not be here: :meth:`spooled`)."""
        sha = sub.sha256 if isinstance(sub, Submission) else sub
        return self.spool / check_sha(sha)

    def spooled(self, sub: Submission) -> Path:
        """The local file holding ``sub``'s bytes, to read them (the shared queue may fetch it first)."""
        return self.spool_path(sub)

    # ------------------------------------------------------------------------------ intake
    def check_quota(self, client_id: str, size: int) -> None:
        """Refuse before reading a byte when ``size`` or the client's queue/bytes quota is exceeded."""
        lim = self.limits
        if size <= 0:
            raise InvalidSubmission("the header must declare total_size > 0 (the payload's byte count)")
        if size > lim.max_submission_bytes:
            raise QuotaExceeded(
                f"expert of {size} bytes exceeds the per-submission limit of "
                f"{lim.max_submission_bytes} bytes; "
                "compress it (fedmerge.codec) or ask the operator to raise limits.max_submission_bytes",
                retryable=False,
            )
        with self._lock:
            queued, total = self._conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN state = 'queued' THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(size), 0) FROM submissions WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if int(queued) >= lim.max_queued:
            raise QuotaExceeded(
                f"client {client_id!r} already has {queued} experts waiting to be merged (limit "
                f"{lim.max_queued}); retry after they are merged",
                retryable=True,
            )
        if lim.max_total_bytes and int(total) + size > lim.max_total_bytes:
            raise QuotaExceeded(
                f"client {client_id!r} has submitted {total} bytes; {size} more exceeds its quota of "
                f"{lim.max_total_bytes} bytes — ask the operator to raise limits.max_total_bytes",
                retryable=False,
            )

    def receive(
        self,
        *,
        client_id: str,
        fmt: str,
        base_version: str,
        label: str,
        total_size: int,
        chunks: Iterable[bytes],
        expected_sha256: str = "",
    ) -> tuple[Submission, bool]:
        """Spool, fsync and enqueue one expert; returns (submission, duplicate)."""
        self._check_format(fmt)
        self.check_quota(client_id, total_size)
        tmp = self.tmp / f"{secrets.token_hex(8)}.partial"
        hasher = hashlib.sha256()
        count = 0
        try:
            with tmp.open("wb") as fh:
                for data in chunks:
                    count += len(data)
                    if count > total_size:
                        raise InvalidSubmission(
                            f"received more than the declared total_size of {total_size} bytes; "
                            "declare the payload's exact size"
                        )
                    hasher.update(data)
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if count != total_size:
                raise InvalidSubmission(
                    f"received {count} bytes but the header declared {total_size}; the stream was cut short "
                    "— resend the expert"
                )
            sha = hasher.hexdigest()
            if expected_sha256 and expected_sha256 != sha:
                raise InvalidSubmission(
                    f"payload hashes to {sha[:12]}… but the header declared "
                    f"{expected_sha256[:12]}…; resend it"
                )
            existing = self.by_sha(sha)
            if existing is not None:
                return existing, True
            os.replace(tmp, self.spool_path(sha))
            fsync_dir(self.spool)
        finally:
            tmp.unlink(missing_ok=True)
        return self._enqueue(sha, client_id, fmt, base_version, label, total_size)

    def receive_bulk(
        self, *, client_id: str, fmt: str, base_version: str, label: str, bulk: BulkStore, sha256: str
    ) -> tuple[Submission, bool]:
        """Enqueue a completed bulk object as an expert (hard link into the spool; no copy)."""
        self._check_format(fmt)
        if not bulk.has(sha256):
            raise InvalidSubmission(
                f"bulk object {sha256[:12]}… is not complete on this server; finish the bulk upload first"
            )
        size = bulk.path(sha256).stat().st_size
        existing = self.by_sha(sha256)
        if existing is not None:
            return existing, True
        self.check_quota(client_id, size)
        target = self.spool_path(sha256)
        if not target.exists():
            tmp = self.tmp / f"{secrets.token_hex(8)}.link"
            try:
                os.link(bulk.path(sha256), tmp)
            except OSError:
                with bulk.open(sha256) as src, tmp.open("wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.replace(tmp, target)
            fsync_dir(self.spool)
        return self._enqueue(sha256, client_id, fmt, base_version, label, size)

    def _check_format(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise InvalidSubmission(f"expert format {fmt!r} is not one of {list(FORMATS)}")

    def _enqueue(
        self, sha: str, client_id: str, fmt: str, base_version: str, label: str, size: int
    ) -> tuple[Submission, bool]:
        stamp = now()
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO submissions (id, sha256, client_id, format, base_version, label, "
                "size, state, version, reason, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', NULL, "
                "NULL, ?, ?) ON CONFLICT DO NOTHING",
                (submission_id(sha), sha, client_id, fmt, base_version, label, size, stamp, stamp),
            )
            inserted = cur.rowcount == 1
        sub = self.by_sha(sha)
        assert sub is not None
        if inserted:
            with self._arrived:
                self._arrived.notify_all()
        return sub, not inserted

    # ------------------------------------------------------------------------------ worker side
    def wait(self, timeout: float) -> None:
        """Block until a new submission arrives or ``timeout`` seconds pass."""
        with self._arrived:
            self._arrived.wait(timeout)

    def wake(self) -> None:
        with self._arrived:
            self._arrived.notify_all()

    def mark_merged(self, ids: Iterable[str], version: str) -> None:
        with self._lock, self._transaction():
            for sid in ids:
                self._conn.execute(
                    "UPDATE submissions SET state = 'merged', version = ?, updated_at = ? WHERE id = ?",
                    (version, now(), sid),
                )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def begin_attempt(self, sid: str) -> int:
        """Durably count one more merge attempt of ``sid`` (before merging it); returns the count.

        A process killed while merging (out of memory, a crash in native code) leaves the row queued
        with its count raised, so the worker can set aside an expert that keeps killing it."""
        with self._lock:
            self._conn.execute(
                "UPDATE submissions SET attempts = attempts + 1, updated_at = ? WHERE id = ?", (now(), sid)
            )
            row = self._conn.execute("SELECT attempts FROM submissions WHERE id = ?", (sid,)).fetchone()
        return 0 if row is None else int(row[0])

    def mark_rejected(self, sid: str, reason: str) -> None:
        """Final state ``rejected``: the expert itself is invalid (``reason`` says why and how to fix it)."""
        self._mark_final(sid, "rejected", reason)

    def mark_failed(self, sid: str, reason: str) -> None:
        """Final state ``failed`` (dead letter): merging it raised an unexpected error, ``reason``."""
        self._mark_final(sid, "failed", reason)

    def _mark_final(self, sid: str, state: str, reason: str) -> None:
        assert state in STATES
        with self._lock:
            self._conn.execute(
                "UPDATE submissions SET state = ?, reason = ?, updated_at = ? WHERE id = ? "
                "AND state = 'queued'",
                (state, reason or f"{state} (no reason given)", now(), sid),
            )
