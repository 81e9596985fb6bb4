"""Operators' metrics: every Prometheus metric fedmerge exposes, on a registry of its own.

``fedmerge serve --metrics-port P`` and ``fedmerge serve-continual --metrics-port P`` serve them at
``http://127.0.0.1:P/metrics`` (:func:`start_metrics_server`); ``docs/metrics.md`` lists them. Names
follow Prometheus conventions: the ``fedmerge_`` prefix, the unit in the name (``_seconds``,
``_bytes``), ``_total`` for counters. Labels take values from small closed sets only
(:data:`REPLY_REASONS`, :data:`INTAKE_REFUSALS`, :data:`SUBMISSION_OUTCOMES`): never a client id or
free text, so the number of series is bounded whatever clients send.

Each :class:`FedmergeMetrics` lives on its own :class:`~prometheus_client.CollectorRegistry` (not the
process-global one), so several servers — or tests — in one process do not collide.

Rounds run in the ServerApp process that Flower's SuperLink starts for each ``flwr run``, while the
endpoint lives in the long-running ``fedmerge serve`` process (so it is up between runs and its
counters keep growing across runs). The ServerApp appends one JSON line per round
(:class:`RoundEvent`) to the file named by the environment variable :data:`EVENTS_ENV`, which
``fedmerge serve`` sets for the SuperLink and so for every ServerApp it starts; the serve process
reads new lines at every scrape (:class:`RoundEventFeed`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.registry import Collector

from fedmerge.errors import ConfigError

EVENTS_ENV = "FEDMERGE_METRICS_EVENTS"

# Why a round's reply was rejected: a closed set, derived from the recorded reason by reply_reason().
REPLY_REASONS = (
    "client_error",  # the ClientApp raised (Flower error reply)
    "timeout",  # no reply within round-deadline-s
    "push_failed",  # the train message could not be pushed to the node
    "stale",  # computed against another base version or round
    "duplicate",  # the node or the same submission already replied this round
    "anomalous",  # screened out by reject-anomalies / reject-min-cosine
    "non_finite",  # merging it made the round's merge NaN or infinite
    "malformed",  # the reply could not be parsed at all
    "invalid",  # any other validation failure (codec, shapes, values, num-examples, ...)
)
# Why a SubmitExpert call was refused before anything was acknowledged.
INTAKE_REFUSALS = ("quota", "invalid", "timeout", "busy", "other")
# What became of an acknowledged expert.
SUBMISSION_OUTCOMES = ("merged", "rejected", "failed")

ROUND_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
MERGE_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


MAX_EVALUATE_METRICS = 16  # metric names a server exports from federated evaluation (client-chosen)


class MetricsBindError(ConfigError):
    """The metrics endpoint may not (or could not) bind the requested address."""


def reply_reason(reason: str | None) -> str:
    """The :data:`REPLY_REASONS` class of a rejected reply's recorded reason (``ReplyOutcome.reason``)."""
    text = (reason or "").strip()
    low = text.lower()
    if low.startswith("client failed"):
        return "client_error"
    if low.startswith("timeout"):
        return "timeout"
    if low.startswith("message could not be pushed"):
        return "push_failed"
    if text.startswith("NonFiniteMerge"):
        return "non_finite"
    if text.startswith("MalformedReply"):
        return "malformed"
    if text.startswith("AnomalousSubmission"):
        return "anomalous"
    message = low.split(": ", 1)[1] if ": " in low else low  # after the exception class name
    if message.startswith("duplicate"):
        return "duplicate"
    if message.startswith("stale"):
        return "stale"
    return "invalid"


@dataclass(frozen=True)
class RoundEvent:
    """What the metrics need of one round attempt (a ``RoundReport`` reduced to numbers and classes)."""

    round: int
    attempt: int
    version_id: str | None
    accepted: int
    rejected: dict[str, int] = field(default_factory=dict)  # REPLY_REASONS class → count
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    wall_s: float = 0.0
    time: float = 0.0  # wall-clock time of the event (seconds since the epoch)
    # the federated evaluation after the round (fedmerge.flower.server.evaluation), when there was one
    evaluate_accepted: int = 0
    evaluate_dropped: int = 0
    evaluate_metrics: dict[str, float] = field(default_factory=dict)  # aggregated, by metric name
    evaluate_downlink_bytes: int = 0

    @classmethod
    def from_report(cls, report: Any) -> RoundEvent:
        """From a :class:`fedmerge.flower.server.commit.RoundReport` (read by attribute only)."""
        rejected: dict[str, int] = {}
        for outcome in report.rejected:
            key = reply_reason(outcome.reason)
            rejected[key] = rejected.get(key, 0) + 1
        ev = getattr(report, "evaluation", None)
        evaluation: dict[str, Any] = {}
        if ev is not None:
            evaluation = {
                "evaluate_accepted": len(ev.accepted),
                "evaluate_dropped": len(ev.dropped),
                "evaluate_metrics": {str(k): float(v) for k, v in ev.metrics.items()},
                "evaluate_downlink_bytes": int(ev.downlink_bytes),
            }
        return cls(
            round=int(report.round),
            attempt=int(report.attempt),
            version_id=report.version_id,
            accepted=len(report.accepted),
            rejected=rejected,
            uplink_bytes=int(report.uplink_bytes),
            downlink_bytes=int(report.downlink_bytes),
            wall_s=float(report.wall_s),
            time=time.time(),
            **evaluation,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> RoundEvent:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("a round event is a JSON object")
        rejected = {str(k): int(v) for k, v in dict(doc.get("rejected") or {}).items()}
        version = doc.get("version_id")
        return cls(
            round=int(doc["round"]),
            attempt=int(doc.get("attempt", 0)),
            version_id=None if version is None else str(version),
            accepted=int(doc.get("accepted", 0)),
            rejected=rejected,
            uplink_bytes=int(doc.get("uplink_bytes", 0)),
            downlink_bytes=int(doc.get("downlink_bytes", 0)),
            wall_s=float(doc.get("wall_s", 0.0)),
            time=float(doc.get("time", 0.0)),
            evaluate_accepted=int(doc.get("evaluate_accepted", 0)),
            evaluate_dropped=int(doc.get("evaluate_dropped", 0)),
            evaluate_metrics={str(k): float(v) for k, v in dict(doc.get("evaluate_metrics") or {}).items()},
            evaluate_downlink_bytes=int(doc.get("evaluate_downlink_bytes", 0)),
        )


def directory_bytes(root: Path) -> int:
    """Σ size of the regular files under ``root`` (symlinks not followed, vanished files skipped)."""
    total = 0
    stack = [Path(root)]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


class FedmergeMetrics:
    """Every fedmerge metric, registered on ``registry`` (a fresh one by default).

    Rounds (``fedmerge serve``): :meth:`observe_round`. Intake (``fedmerge serve-continual``):
    :meth:`intake_acknowledged`, :meth:`intake_refused`, :meth:`submission_finished`,
    :meth:`watch_queue`. Both: :meth:`committed`, :meth:`watch_store`, :meth:`add_uplink`,
    :meth:`add_downlink`. Metrics a server does not use stay at zero.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._evaluate_names: set[str] = set()  # metric names exported so far (bounded label set)
        counter, gauge = self._counter, self._gauge
        # rounds
        self.rounds_completed = counter("fedmerge_rounds_completed", "Rounds that committed a version.")
        self.rounds_uncommitted = counter(
            "fedmerge_rounds_uncommitted",
            "Round attempts that ended with fewer than min-valid accepted replies (nothing committed).",
        )
        self.replies_accepted = counter(
            "fedmerge_round_replies_accepted", "Round replies accepted and folded into the merge."
        )
        self.replies_rejected = counter(
            "fedmerge_round_replies_rejected",
            "Round replies rejected, by reason class.",
            ("reason", REPLY_REASONS),
        )
        self.round_duration = Histogram(
            "fedmerge_round_duration_seconds",
            "Wall time of a round attempt: sampling, messages, replies, merge, evaluation, commit.",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=r,
        )
        # bytes
        self.uplink = counter(
            "fedmerge_uplink_bytes",
            "Model payload bytes received from clients (round replies; intake and bulk uploads).",
        )
        self.downlink = counter(
            "fedmerge_downlink_bytes",
            "Model payload bytes sent to clients (round weights or updates; GetVersion streams).",
        )
        # intake
        self.intake_acknowledged_total = counter(
            "fedmerge_intake_acknowledged",
            "Experts durably received and acknowledged (new submissions, not duplicates).",
        )
        self.intake_duplicates = counter(
            "fedmerge_intake_duplicates", "Experts received again (same bytes as an earlier one)."
        )
        self.intake_refused_total = counter(
            "fedmerge_intake_refused",
            "SubmitExpert calls refused before acknowledgement, by reason class.",
            ("reason", INTAKE_REFUSALS),
        )
        self.unauthenticated = counter(
            "fedmerge_rpc_unauthenticated", "gRPC calls refused for a missing or unknown bearer token."
        )
        self.submissions = counter(
            "fedmerge_submissions",
            "Acknowledged experts that reached a final state, by outcome.",
            ("outcome", SUBMISSION_OUTCOMES),
        )
        self.merge_latency = Histogram(
            "fedmerge_merge_latency_seconds",
            "Time from an expert's acknowledgement to the commit of the version that merges it.",
            buckets=MERGE_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = gauge("fedmerge_intake_queue_depth", "Acknowledged experts waiting to be merged.")
        # store and versions
        # federated evaluation (evaluate messages after a round)
        self.evaluate_replies = counter(
            "fedmerge_evaluate_replies",
            "Evaluate replies, accepted into the aggregate or dropped.",
            ("outcome", ("accepted", "dropped")),
        )
        self.evaluate_metric = gauge(
            "fedmerge_evaluate_metric",
            "The last federated evaluation's metrics, weighted by num-examples (at most "
            f"{MAX_EVALUATE_METRICS} metric names per server; later names are not exported).",
            "metric",
        )
        self.last_evaluated_round = gauge(
            "fedmerge_last_evaluated_round", "Round of the last federated evaluation."
        )
        self.versions_committed = counter("fedmerge_versions_committed", "Versions this server committed.")
        self.last_round = gauge(
            "fedmerge_last_committed_round",
            "Round of the last committed version (continual: experts merged into the track).",
        )
        self.last_commit_time = gauge(
            "fedmerge_last_commit_timestamp_seconds",
            "When the last version was committed (seconds since the epoch).",
        )
        self.last_version = Info(
            "fedmerge_last_committed_version", "Id of the last committed version.", registry=r
        )
        self.store_size = gauge(
            "fedmerge_store_size_bytes", "Bytes of the files under the model store directory."
        )

    def _counter(self, name: str, doc: str, labelled: tuple[str, Iterable[str]] | None = None) -> Counter:
        """A counter on this registry; ``labelled`` = (label, values): one child per value from the start,
        so every series of the bounded label set is exported at 0 before its first event."""
        if labelled is None:
            return Counter(name, doc, registry=self.registry)
        label, values = labelled
        metric = Counter(name, doc, [label], registry=self.registry)
        for value in values:
            metric.labels(value)
        return metric

    def _gauge(self, name: str, doc: str, label: str | None = None) -> Gauge:
        """A gauge on this registry (with one label, its children made as values arrive)."""
        return Gauge(name, doc, [label] if label else (), registry=self.registry)

    # ------------------------------------------------------------------------------ rounds
    def observe_round(self, event: RoundEvent) -> None:
        """Count one round attempt: completed or not, replies by outcome, bytes, duration, commit."""
        self.replies_accepted.inc(event.accepted)
        for reason, count in event.rejected.items():
            self.replies_rejected.labels(reason if reason in REPLY_REASONS else "invalid").inc(count)
        self.uplink.inc(event.uplink_bytes)
        self.downlink.inc(event.downlink_bytes)
        self.round_duration.observe(event.wall_s)
        self.observe_evaluation(event)
        if event.version_id is None:
            self.rounds_uncommitted.inc()
            return
        self.rounds_completed.inc()
        self.committed(event.version_id, event.round, at=event.time or None)

    def observe_evaluation(self, event: RoundEvent) -> None:
        """Count the round's federated evaluation (nothing when it had none): replies by outcome,
        its downlink, and each aggregated metric as a gauge (a bounded set of metric names)."""
        if not event.evaluate_accepted and not event.evaluate_dropped:
            return
        self.evaluate_replies.labels("accepted").inc(event.evaluate_accepted)
        self.evaluate_replies.labels("dropped").inc(event.evaluate_dropped)
        self.downlink.inc(event.evaluate_downlink_bytes)
        self.last_evaluated_round.set(event.round)
        for name, value in sorted(event.evaluate_metrics.items()):
            if name in self._evaluate_names or len(self._evaluate_names) < MAX_EVALUATE_METRICS:
                self._evaluate_names.add(name)
                self.evaluate_metric.labels(name).set(value)

    # ------------------------------------------------------------------------------ intake
    def intake_acknowledged(self, duplicate: bool) -> None:
        (self.intake_duplicates if duplicate else self.intake_acknowledged_total).inc()

    def intake_refused(self, reason: str) -> None:
        self.intake_refused_total.labels(reason if reason in INTAKE_REFUSALS else "other").inc()

    def submission_finished(self, outcome: str, acknowledged_at: str | None = None) -> None:
        """One expert reached ``outcome``; a merged one also observes its latency since
        ``acknowledged_at`` (an ISO-8601 timestamp with its zone, as the queue records it)."""
        if outcome not in SUBMISSION_OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {SUBMISSION_OUTCOMES}")
        self.submissions.labels(outcome).inc()
        if outcome == "merged" and acknowledged_at:
            try:
                since = datetime.fromisoformat(acknowledged_at).timestamp()
            except ValueError:
                return
            self.merge_latency.observe(max(0.0, time.time() - since))

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the queue depth at every scrape."""
        self.queue_depth.set_function(lambda: float(depth()))

    # ------------------------------------------------------------------------------ both
    def add_uplink(self, n: int) -> None:
        self.uplink.inc(n)

    def add_downlink(self, n: int) -> None:
        self.downlink.inc(n)

    def committed(self, version_id: str, round_: int | None, at: float | None = None) -> None:
        """A version was committed by this server."""
        self.versions_committed.inc()
        self.show_version(version_id, round_, at)

    def show_version(self, version_id: str, round_: int | None, at: float | None = None) -> None:
        """Set the last-committed gauges (without counting a commit: e.g. the store's head at start)."""
        self.last_version.info({"version": version_id})
        self.last_round.set(float(round_ or 0))
        self.last_commit_time.set(at if at is not None else time.time())

    def watch_store(self, root: Path) -> None:
        """Report the store directory's size (:func:`directory_bytes`) at every scrape."""
        self.store_size.set_function(lambda: float(directory_bytes(root)))


# ---------------------------------------------------------------------------------- round events


class RoundEventLog:
    """Appends one :class:`RoundEvent` JSON line per round to ``path`` (the ServerApp side)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, report: Any) -> None:
        self.write(RoundEvent.from_report(report))

    def write(self, event: RoundEvent) -> None:
        line = (event.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write of a short line: appends do not interleave
        finally:
            os.close(fd)

    @classmethod
    def from_env(cls) -> RoundEventLog | None:
        """The log named by :data:`EVENTS_ENV`, or None when it is unset (metrics off)."""
        path = os.environ.get(EVENTS_ENV, "")
        return cls(Path(path)) if path else None


class RoundEventFeed(Collector):
    """Reads the round events appended to ``path`` since the last read into ``metrics``.

    Registered on the registry *before* the metrics (see :func:`feed_registry`), so each scrape first
    takes in every complete line written so far, then reports. Lines that are not valid events are
    skipped and counted in :attr:`skipped`.
    """

    def __init__(self, path: Path, metrics: FedmergeMetrics | None = None) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.offset = 0
        self.skipped = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Start with an empty file (events of an earlier server are not this server's)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")
        self.offset = 0

    def poll(self) -> int:
        """Apply every complete line appended since the last poll; returns how many events were read."""
        with self._lock:
            try:
                with self.path.open("rb") as fh:
                    if os.fstat(fh.fileno()).st_size < self.offset:  # emptied meanwhile: start over
                        self.offset = 0
                    fh.seek(self.offset)
                    data = fh.read()
            except FileNotFoundError:
                return 0
            end = data.rfind(b"\n")
            if end < 0:
                return 0
            self.offset += end + 1
            count = 0
            for raw in data[: end + 1].splitlines():
                if not raw.strip():
                    continue
                try:
                    event = RoundEvent.from_json(raw.decode())
                except (ValueError, KeyError, TypeError):
                    self.skipped += 1
                    continue
                if self.metrics is not None:
                    self.metrics.observe_round(event)
                count += 1
            return count

    def collect(self) -> Iterator[Any]:
        self.poll()
        return iter(())

    def describe(self) -> Iterable[Any]:
        return ()


def feed_registry(path: Path) -> tuple[FedmergeMetrics, RoundEventFeed]:
    """Metrics on a fresh registry that reads round events from ``path`` (emptied) at each scrape."""
    registry = CollectorRegistry()
    feed = RoundEventFeed(path)
    feed.reset()
    registry.register(feed)  # first: collected before the metrics it updates
    metrics = FedmergeMetrics(registry)
    feed.metrics = metrics
    return metrics, feed


# ---------------------------------------------------------------------------------- HTTP endpoint


class _Server(Protocol):
    server_port: int

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_metrics_bind(host: str, allow_remote: bool) -> None:
    """Refuse (:class:`MetricsBindError`) a non-loopback ``host`` unless ``allow_remote``."""
    if not is_loopback(host) and not allow_remote:
        raise MetricsBindError(
            f"--metrics-host {host} is not a loopback address: the metrics endpoint has no "
            "authentication; pass --metrics-allow-remote to expose it there on purpose (and restrict "
            "it by firewall), or scrape through 127.0.0.1"
        )


@dataclass
class MetricsServer:
    """A running metrics endpoint (``url`` ends with ``/metrics``); :meth:`stop` closes it."""

    host: str
    port: int
    server: _Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def start_metrics_server(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False
) -> MetricsServer:
    """Serve ``registry`` in Prometheus' text format on ``http://host:port/metrics`` from a daemon
    thread (port 0 = any free port; the bound one is ``.port``).

    A non-loopback ``host`` is refused unless ``allow_remote`` (:func:`check_metrics_bind`); a port in
    use raises :class:`MetricsBindError`."""
    from prometheus_client import start_http_server

    check_metrics_bind(host, allow_remote)
    if not 0 <= port <= 65535:
        raise MetricsBindError(f"--metrics-port {port} must be in 0..65535")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsBindError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(host, int(server.server_port), server, thread)
