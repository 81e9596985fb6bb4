"""The intake page's numbers, from the intake's own read API (:mod:`fedmerge.service.intake_stats`:
a read-only snapshot of the durable queue), so ``fedmerge dashboard --store DIR`` shows the queue of
a running or stopped ``serve-continual`` without knowing the queue's table or where it is kept: the
SQLite file of one server's data directory, or the PostgreSQL database of replicas sharing the
catalog (the dashboard's ``--catalog``, :data:`~fedmerge.dashboard.views.CATALOG_ENV`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedmerge.dashboard.views import CATALOG_ENV, parse_time
from fedmerge.service import intake_stats
from fedmerge.service.intake_stats import QueuedSubmission, QueueSource, QueueUnreadable, read_queue

log = logging.getLogger(__name__)

RECENT = 50
"""How many recent rejections and merges the page lists."""
WINDOW_MINUTES = 30
"""The submissions-per-minute chart covers this many minutes ending now."""


IntakeEvent = QueuedSubmission
"""One submission as the page lists it."""


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


IntakeUnreadable = QueueUnreadable
"""The queue database exists but could not be read (locked, or not an intake queue)."""

__all__ = ["IntakeEvent", "IntakeStatus", "IntakeUnreadable", "find_queue", "read_intake"]


def find_queue(data_dir: Path | None) -> QueueSource | None:
    """Where the intake's queue is: the shared catalog's database when it holds the queue, else
    ``data_dir/queue.sqlite`` if it exists, else None (an unreachable database counts as none)."""
    try:
        return intake_stats.find_queue(data_dir, catalog=os.environ.get(CATALOG_ENV) or None)
    except QueueUnreadable as exc:
        log.warning("intake page: %s", exc)
        return None


def read_intake(data_dir: Path | None, *, now: datetime | None = None) -> IntakeStatus:
    """Summarise the queue of ``data_dir`` or of the shared catalog (:func:`find_queue`; see
    :class:`IntakeStatus`); read-only. :class:`IntakeUnreadable` when there is none to read."""
    source = find_queue(data_dir)
    if source is None:
        raise IntakeUnreadable(f"no intake queue in {data_dir} or in the shared catalog")
    start = (now or datetime.now(UTC)) - timedelta(minutes=WINDOW_MINUTES)
    snap = read_queue(source, recent=RECENT, since=start.isoformat())
    states, created = snap.states, snap.created_since
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
    events_merged = snap.merged
    latency: list[tuple[str, float]] = []
    for e in reversed(events_merged):
        a, b = parse_time(e.created_at), parse_time(e.updated_at)
        if a is not None and b is not None:
            latency.append((e.id, max(0.0, (b - a).total_seconds())))
    return IntakeStatus(
        queue_depth=int(states.get("queued", 0)),
        states=dict(states),
        per_minute=per_minute,
        rate_per_minute=last10 / 10.0,
        ack_to_merge_s=latency,
        rejections=snap.refused,
        merged=events_merged,
    )
