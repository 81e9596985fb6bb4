"""The intake queue's read API: what an observer (the dashboard) may read of the durable queue of
:mod:`fedmerge.service.intake`, without knowing its table.

The intake persists every acknowledged submission in ``<data-dir>/queue.sqlite`` before it answers
and marks it merged (with the version), rejected or failed (with a reason). :func:`read_queue` opens
that database read-only (``mode=ro``: it never creates or migrates it), so the queue of a running or
stopped ``serve-continual`` can be shown.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fedmerge.errors import FedMergeError

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
    """The queue database exists but could not be read (locked, or not an intake queue)."""


def find_queue(data_dir: Path) -> Path | None:
    """``data_dir/queue.sqlite`` if it exists."""
    path = Path(data_dir) / QUEUE_FILE
    return path if path.is_file() else None


_COLUMNS = "id, client_id, state, version, reason, created_at, updated_at"


def read_queue(data_dir: Path, *, recent: int, since: str) -> QueueSnapshot:
    """A read-only snapshot of the queue under ``data_dir``: counts per state, the ``recent`` latest
    refused and merged submissions, and the acknowledgement times not before ``since`` (ISO 8601)."""
    path = Path(data_dir).resolve() / QUEUE_FILE
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise QueueUnreadable(f"cannot open {path}: {exc}") from None
    try:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM submissions GROUP BY state").fetchall())
        refused = conn.execute(
            f"SELECT {_COLUMNS} FROM submissions WHERE state IN ('rejected', 'failed') "
            "ORDER BY updated_at DESC, seq DESC LIMIT ?",
            (recent,),
        ).fetchall()
        merged = conn.execute(
            f"SELECT {_COLUMNS} FROM submissions WHERE state = 'merged' "
            "ORDER BY updated_at DESC, seq DESC LIMIT ?",
            (recent,),
        ).fetchall()
        created = conn.execute(
            "SELECT created_at FROM submissions WHERE created_at >= ?", (since,)
        ).fetchall()
    except sqlite3.Error as exc:
        raise QueueUnreadable(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()
    return QueueSnapshot(
        states={str(k): int(v) for k, v in states.items()},
        refused=[_row(r) for r in refused],
        merged=[_row(r) for r in merged],
        created_since=[str(r[0]) for r in created],
    )


def _row(row: tuple[object, ...]) -> QueuedSubmission:
    def text(value: object) -> str | None:
        return None if value is None else str(value)

    ident, client, state, version, reason, created, updated = row
    return QueuedSubmission(
        str(ident), str(client), str(state), text(version), text(reason), str(created), str(updated)
    )
