"""The intake queue's read API: what an observer (the dashboard) may read of the durable queue of
:mod:`fedmerge.service.intake`, without knowing its table or where it is kept.

The intake persists every acknowledged submission before it answers and marks it merged (with the
version), rejected or failed (with a reason). One server keeps that queue in
``<data-dir>/queue.sqlite``; replicas sharing a PostgreSQL catalog keep it in that database
(:mod:`fedmerge.service.replicas`). :func:`find_queue` says where the queue of a data directory and
catalog is, and :func:`read_queue` reads a snapshot of it: the SQLite file is opened read-only
(``mode=ro``: never created or migrated), the database is only queried (``SELECT``), so the queue of
a running or stopped ``serve-continual`` can be shown.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedmerge.errors import FedMergeError
from fedmerge.store.errors import StoreBusyError
from fedmerge.store.pg_catalog import PgConnection, is_postgres_url, redact

QUEUE_FILE = "queue.sqlite"
"""The queue database under the intake's data directory (:class:`fedmerge.service.intake.IntakeQueue`)."""


@dataclass(frozen=True)
class QueuedSubmission:
    """One submission as the queue records it (times are ISO 8601 text, as stored)."""

    id: str
    client_id: str
    state: str
    version: str | None
    reason: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class QueueSnapshot:
    """``states``: submissions per state (queued, merged, rejected, failed); ``refused``: the most
    recent rejected or failed, newest first; ``merged``: the most recent merged, newest first;
    ``created_since``: the acknowledgement times at or after the ``since`` asked for."""

    states: dict[str, int]
    refused: list[QueuedSubmission]
    merged: list[QueuedSubmission]
    created_since: list[str]


class QueueUnreadable(FedMergeError, OSError):
    """The queue database could not be read (locked, unreachable, or not an intake queue)."""


QueueSource = Path | str
"""Where a queue is: the SQLite file (or the data directory holding it), or a ``postgresql://`` URL."""


def find_queue(data_dir: Path | None, catalog: str | None = None) -> QueueSource | None:
    """The queue of ``serve-continual``: with a PostgreSQL ``catalog`` whose database holds the
    intake's table, that URL (the replicas' shared queue); else ``data_dir/queue.sqlite`` if it
    exists; else None. A database that cannot be reached is :class:`QueueUnreadable`."""
    if catalog and is_postgres_url(catalog):
        with _pg(catalog) as conn:
            found = conn.execute("SELECT to_regclass('submissions') IS NOT NULL").fetchone()
        if found is not None and bool(found[0]):
            return catalog
    if data_dir is None:
        return None
    path = Path(data_dir) / QUEUE_FILE
    return path if path.is_file() else None


_COLUMNS = "id, client_id, state, version, reason, created_at, updated_at"


def read_queue(source: QueueSource, *, recent: int, since: str) -> QueueSnapshot:
    """A read-only snapshot of the queue at ``source`` (:func:`find_queue`; a data directory is read
    as its ``queue.sqlite``): counts per state, the ``recent`` latest refused and merged
    submissions, and the acknowledgement times not before ``since`` (ISO 8601)."""
    if isinstance(source, str) and is_postgres_url(source):
        with _pg(source) as conn:
            try:
                return _snapshot(conn.execute, recent, since)
            except Exception as exc:  # psycopg's errors: the table is not an intake queue's
                raise QueueUnreadable(f"cannot read the queue in {redact(source)}: {exc}") from None
    path = Path(source).resolve()
    if path.is_dir():
        path = path / QUEUE_FILE
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        sqlite = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise QueueUnreadable(f"cannot open {path}: {exc}") from None
    try:
        return _snapshot(sqlite.execute, recent, since)
    except sqlite3.Error as exc:
        raise QueueUnreadable(f"cannot read {path}: {exc}") from None
    finally:
        sqlite.close()


def _snapshot(execute: Callable[..., Any], recent: int, since: str) -> QueueSnapshot:
    """The snapshot's queries (``?`` placeholders), the same on SQLite and PostgreSQL."""
    states = dict(execute("SELECT state, COUNT(*) FROM submissions GROUP BY state").fetchall())
    refused = execute(
        f"SELECT {_COLUMNS} FROM submissions WHERE state IN ('rejected', 'failed') "
        "ORDER BY updated_at DESC, seq DESC LIMIT ?",
        (recent,),
    ).fetchall()
    merged = execute(
        f"SELECT {_COLUMNS} FROM submissions WHERE state = 'merged' "
        "ORDER BY updated_at DESC, seq DESC LIMIT ?",
        (recent,),
    ).fetchall()
    created = execute("SELECT created_at FROM submissions WHERE created_at >= ?", (since,)).fetchall()
    return QueueSnapshot(
        states={str(k): int(v) for k, v in states.items()},
        refused=[_row(r) for r in refused],
        merged=[_row(r) for r in merged],
        created_since=[str(r[0]) for r in created],
    )


@contextmanager
def _pg(url: str) -> Iterator[PgConnection]:
    """A short-lived connection to the queue's database (unreachable: :class:`QueueUnreadable`)."""
    try:
        conn = PgConnection(url, busy_timeout=5.0, connect_timeout=5.0)
    except StoreBusyError as exc:
        raise QueueUnreadable(str(exc)) from None
    try:
        yield conn
    except StoreBusyError as exc:  # the connection was lost mid-read
        raise QueueUnreadable(str(exc)) from None
    finally:
        conn.close()


def _row(row: tuple[object, ...]) -> QueuedSubmission:
    def text(value: object) -> str | None:
        return None if value is None else str(value)

    ident, client, state, version, reason, created, updated = row
    return QueuedSubmission(
        str(ident), str(client), str(state), text(version), text(reason), str(created), str(updated)
    )
