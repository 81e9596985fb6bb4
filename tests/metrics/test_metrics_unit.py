"""fedmerge.metrics on its own: reason classes, round events, the event feed, the endpoint's binding."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from metrics_helpers import scrape, value

from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.judge import ReplyOutcome
from fedmerge.metrics import (
    REPLY_REASONS,
    FedmergeMetrics,
    MetricsBindError,
    RoundEvent,
    RoundEventLog,
    feed_registry,
    is_loopback,
    reply_reason,
    start_metrics_server,
)

# reasons as the round engine records them (fedmerge/flower/server/judge.py, commit.py and safeguards.py)
RECORDED = {
    "client failed (code 0): RuntimeError: simulated crash": "client_error",
    "timeout: no reply within round-deadline-s=5": "timeout",
    "message could not be pushed": "push_failed",
    "StaleOrInvalid: stale: package is for round 1, this is round 2": "stale",
    "StaleOrInvalid: duplicate: node 3 already replied in round 1": "duplicate",
    "AnomalousSubmission: norm z-score 9.1 above 3": "anomalous",
    "NonFiniteMerge: merging it makes tensor 'w' NaN or infinite; left out of the merge": "non_finite",
    "MalformedReply: reply could not be read (KeyError: 'x')": "malformed",
    "CodecError: checksum mismatch": "invalid",
    "StaleOrInvalid: num-examples=0 from 'c' is outside [1, max-num-examples=10]": "invalid",
}


def test_every_recorded_reason_falls_in_its_closed_class() -> None:
    for reason, expected in RECORDED.items():
        assert reply_reason(reason) == expected, reason
    assert set(RECORDED.values()) == set(REPLY_REASONS)
    assert reply_reason(None) == "invalid"


def _report() -> RoundReport:
    outcomes = [
        ReplyOutcome(1, "a", True, None, 10, "h1", wire_bytes=100, dense_bytes=400),
        ReplyOutcome(2, "b", True, None, 20, "h2", wire_bytes=150, dense_bytes=400),
        ReplyOutcome(3, "c", False, "timeout: no reply within round-deadline-s=5"),
        ReplyOutcome(4, "d", False, "StaleOrInvalid: stale: package is for round 1, this is round 2",
                     wire_bytes=70),
    ]  # fmt: skip
    return RoundReport(2, 0, "v0", outcomes, "v1", downlink_bytes=999, wall_s=1.25)


def test_round_event_of_a_report_round_trips_through_json() -> None:
    event = RoundEvent.from_report(_report())
    assert (event.round, event.version_id, event.accepted) == (2, "v1", 2)
    assert event.rejected == {"timeout": 1, "stale": 1}
    assert (event.uplink_bytes, event.downlink_bytes, event.wall_s) == (320, 999, 1.25)
    assert RoundEvent.from_json(event.to_json()) == event


def test_the_feed_reads_complete_lines_once_and_skips_garbage(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("left over from an earlier server\n")
    metrics, feed = feed_registry(path)  # empties the file
    RoundEventLog(path)(_report())
    with path.open("a") as fh:
        fh.write("not json\n")
        fh.write(RoundEvent(3, 0, None, 1, {"client_error": 1}).to_json())  # no newline yet: not read
    assert feed.poll() == 1 and feed.skipped == 1
    assert feed.poll() == 0
    with path.open("a") as fh:
        fh.write("\n")
    server = start_metrics_server(metrics.registry)
    try:
        samples = scrape(server.url)  # the scrape itself polls the feed
    finally:
        server.stop()
    assert value(samples, "fedmerge_rounds_completed_total") == 1
    assert value(samples, "fedmerge_rounds_uncommitted_total") == 1
    assert value(samples, "fedmerge_round_replies_accepted_total") == 3
    assert value(samples, "fedmerge_round_replies_rejected_total", reason="timeout") == 1
    assert value(samples, "fedmerge_round_replies_rejected_total", reason="client_error") == 1
    assert value(samples, "fedmerge_uplink_bytes_total") == 320
    assert value(samples, "fedmerge_last_committed_version_info", version="v1") == 1
    assert value(samples, "fedmerge_last_committed_round") == 2
    path.write_text(RoundEvent(4, 0, "v2", 1).to_json() + "\n")  # emptied and rewritten meanwhile
    assert feed.poll() == 1


def test_two_servers_in_one_process_keep_separate_counts() -> None:
    a, b = FedmergeMetrics(), FedmergeMetrics()
    a.intake_acknowledged(duplicate=False)
    assert a.registry.get_sample_value("fedmerge_intake_acknowledged_total") == 1
    assert b.registry.get_sample_value("fedmerge_intake_acknowledged_total") == 0
    with pytest.raises(ValueError, match="outcome"):
        a.submission_finished("lost")


def test_binding_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    with pytest.raises(MetricsBindError, match="--metrics-allow-remote"):
        start_metrics_server(FedmergeMetrics().registry, "0.0.0.0", 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MetricsBindError, match="cannot serve metrics"):
            start_metrics_server(FedmergeMetrics().registry, "127.0.0.1", taken.getsockname()[1])
