"""The intake page's numbers, read from the intake's durable queue (``<data-dir>/queue.sqlite``).

The expert intake (:mod:`fedmerge.service.intake`) persists every acknowledged submission in a SQLite
table before it answers, and marks it merged (with the version), rejected or failed (with a reason).
:func:`read_intake` opens that database read-only (``mode=ro``; it never creates or migrates it) so
``fedmerge dashboard --store DIR`` shows the queue of a running or stopped ``serve-continual``.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from fedmerge.dashboard.views import parse_time

QUEUE_FILE = "queue.sqlite"
RECENT = 50
"""How many recent rejections and merges the page lists."""
WINDOW_MINUTES = 30
"""The submissions-per-minute chart covers this many minutes ending now."""


@dataclass(frozen=True)
class IntakeEvent:
    """One submission as the page lists it."""

    id: str
    client_id: str
    state: str
    version: str | None
    reason: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class IntakeStatus:
    """A snapshot of the intake queue.

    ``queue_depth``: submissions acknowledged and not yet merged, rejected or failed.
    ``states``: count per state (queued, merged, rejected, failed).
    ``per_minute``: (minutes before now, submissions acknowledged in that minute), oldest first, over
    the last :data:`WINDOW_MINUTES` minutes. ``rate_per_minute``: acknowledged in the last 10 minutes / 10.
    ``ack_to_merge_s``: seconds from acknowledgement to merge of the most recent merged submissions,
    oldest first. ``rejections``: the most recent rejected or failed submissions, newest first.
    """

    queue_depth: int
    states: dict[str, int]
    per_minute: list[tuple[int, int]]
    rate_per_minute: float
    ack_to_merge_s: list[tuple[str, float]]
    rejections: list[IntakeEvent] = field(default_factory=list)
    merged: list[IntakeEvent] = field(default_factory=list)

    def fingerprint(self) -> str:
        return f"{self.queue_depth}|{sorted(self.states.items())}"


class IntakeUnreadable(Exception):
    """The queue database exists but could not be read (locked, or not an intake queue)."""


def find_queue(data_dir: Path) -> Path | None:
    """``data_dir/queue.sqlite`` if it exists."""
    path = Path(data_dir) / QUEUE_FILE
    return path if path.is_file() else None


def read_intake(data_dir: Path, *, now: datetime | None = None) -> IntakeStatus:
    """Summarise the queue under ``data_dir`` (see :class:`IntakeStatus`); read-only."""
    path = Path(data_dir).resolve() / QUEUE_FILE
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise IntakeUnreadable(f"cannot open {path}: {exc}") from None
    try:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM submissions GROUP BY state").fetchall())
        cols = "id, client_id, state, version, reason, created_at, updated_at"
        recent_bad = conn.execute(
            f"SELECT {cols} FROM submissions WHERE state IN ('rejected', 'failed') "
            "ORDER BY updated_at DESC, seq DESC LIMIT ?",
            (RECENT,),
        ).fetchall()
        recent_merged = conn.execute(
            f"SELECT {cols} FROM submissions WHERE state = 'merged' ORDER BY updated_at DESC, seq DESC "
            "LIMIT ?",
            (RECENT,),
        ).fetchall()
        start = (now or datetime.now(UTC)) - timedelta(minutes=WINDOW_MINUTES)
        created = [
            r[0]
            for r in conn.execute(
                "SELECT created_at FROM submissions WHERE created_at >= ?", (start.isoformat(),)
            ).fetchall()
        ]
    except sqlite3.Error as exc:
        raise IntakeUnreadable(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()
    current = now or datetime.now(UTC)
    buckets: Counter[int] = Counter()
    last10 = 0
    for text in created:
        at = parse_time(str(text))
        if at is None:
            continue
        ago = int((current - at).total_seconds() // 60)
        if 0 <= ago < WINDOW_MINUTES:
            buckets[ago] += 1
            if ago < 10:
                last10 += 1
    per_minute = [(-m, buckets.get(m, 0)) for m in range(WINDOW_MINUTES - 1, -1, -1)]
    events_merged = [IntakeEvent(*map(_text, r)) for r in recent_merged]  # type: ignore[arg-type]
    latency: list[tuple[str, float]] = []
    for e in reversed(events_merged):
        a, b = parse_time(e.created_at), parse_time(e.updated_at)
        if a is not None and b is not None:
            latency.append((e.id, max(0.0, (b - a).total_seconds())))
    return IntakeStatus(
        queue_depth=int(states.get("queued", 0)),
        states={str(k): int(v) for k, v in states.items()},
        per_minute=per_minute,
        rate_per_minute=last10 / 10.0,
        ack_to_merge_s=latency,
        rejections=[IntakeEvent(*map(_text, r)) for r in recent_bad],  # type: ignore[arg-type]
        merged=events_merged,
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
