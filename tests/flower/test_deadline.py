"""The round deadline on Flower's simulation engine: a straggler that replies after ``round-deadline-s``
does not hold the round back.

* one straggler, two timely clients, ``min-valid=2``: the round commits the two timely replies and
  records the straggler as a rejected contributor whose reason is the deadline timeout;
* two stragglers, one timely client, ``min-valid=2``: no attempt reaches ``min-valid``, the round is
  retried ``max-retries`` times with fresh messages, then the run stops with ``RoundAborted``, and the
  store holds nothing but its base.

The straggler (``BEHAVIOURS["straggler"]`` in conftest.py) trains correctly and replies
``STRAGGLER_OVERRUN_S`` after its message's deadline (created + TTL, the TTL being
``round-deadline-s``). Ray gets one actor per node so that a sleeping straggler never delays a
timely client (on a 2-core machine two stragglers would otherwise occupy every slot), and every
node answers a warm-up query before round 1 so that the deadline measures the round, not Ray's
start-up. ``tests/flower/test_simulation.py`` covers retry-then-abort when clients *crash*; here the
replies are valid but late.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.federation import RoundAborted
from fedmerge.flower.simulation import emit_report, run_simulation_app
from fedmerge.store import ModelStore
from fedmerge_server.app import run_server

pytestmark = pytest.mark.slow

Scripted = Callable[[list[str]], ClientApp]

NODES = 3
DEADLINE_S = 15.0  # a warm digits round takes ~2.5 s on the loaded 2-core machine; the straggler overruns
WARM_UP_S = 300.0


def _warm_up(grid: Grid, nodes: int) -> None:
    """One ``query`` message per node, waited for without a round deadline, so that every Ray actor
    has started and imported the ClientApp before round 1 (the scripted app has no query handler: the
    replies are errors, which is fine). Without this the deadline would have to cover actor start-up
    (~25 s under load), not just the round."""
    end = time.monotonic() + WARM_UP_S
    ids = list(grid.get_node_ids())
    while len(ids) < nodes and time.monotonic() < end:
        time.sleep(0.1)
        ids = list(grid.get_node_ids())
    queries = [Message(RecordDict(), dst_node_id=n, message_type="query", ttl=WARM_UP_S) for n in ids]
    replies = list(grid.send_and_receive(queries, timeout=WARM_UP_S))
    assert len(replies) == nodes, f"warm-up: {len(replies)} of {nodes} nodes replied"


def _run(store: Path, plan: list[str], scripted: Scripted, reports: list[RoundReport], **over: Any) -> None:
    """The fedmerge round engine (``run_server``) with ``plan[i]`` at partition i, after a warm-up;
    every round report lands in ``reports`` (also those of a run that ends in RoundAborted)."""
    config: dict[str, Any] = {
        "store": str(store),
        "num-rounds": 1,
        "local-epochs": 1,
        "lr": 0.05,
        "min-clients": NODES,
        "min-valid": 2,
        "round-deadline-s": DEADLINE_S,
        "server-eval": False,
        "seed": 0,
        **{k.replace("_", "-"): v for k, v in over.items()},
    }
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _warm_up(grid, len(plan))
        run_server(grid, parse_run_config(dict(context.run_config)), emit_report)

    run_simulation_app(  # a RoundAborted of the ServerApp is raised here
        app,
        scripted(plan),
        num_supernodes=len(plan),
        run_config=config,
        ray_num_cpus=len(plan),  # one actor per node: a straggler blocks no one
        on_report=reports.append,
    )


def _timeouts(report: RoundReport) -> list[str]:
    return [o.reason or "" for o in report.rejected if (o.reason or "").startswith("timeout")]


def test_straggler_past_the_deadline_is_recorded_and_the_round_commits_the_timely_replies(
    tmp_path: Path, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    reports: list[RoundReport] = []
    _run(store, ["ok", "ok", "straggler"], scripted_client_app, reports)
    assert [(r.round, r.attempt, r.version_id) for r in reports] == [(1, 0, "v000002")]
    report = reports[0]
    assert len(report.accepted) == 2 and len(report.outcomes) == NODES
    assert report.wall_s >= DEADLINE_S  # the round waited for the straggler until the deadline
    assert _timeouts(report) == [f"timeout: no reply within round-deadline-s={DEADLINE_S:g}"]
    with ModelStore.open(store) as st:
        version = st.get("latest")
        assert version.id == "v000002" and version.round == 1 and version.parents == ("v000001",)
        accepted = sorted(c.client_id for c in version.contributors if c.accepted)
        assert accepted == ["client-0", "client-1"]
        late = [c for c in version.contributors if not c.accepted]
        assert len(late) == 1 and late[0].client_id.startswith("node-")  # never identified itself
        assert late[0].reason is not None and "round-deadline-s" in late[0].reason
        assert late[0].num_examples == 0
        assert version.metrics["accepted"] == 2.0 and version.metrics["rejected"] == 1.0
        assert st.verify().ok


def test_too_few_replies_before_the_deadline_are_retried_then_aborted_without_a_version(
    tmp_path: Path, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    reports: list[RoundReport] = []
    with pytest.raises(RoundAborted, match=r"fewer than min-valid=2 valid replies in 2 attempt\(s\)") as info:
        _run(store, ["ok", "straggler", "straggler"], scripted_client_app, reports, max_retries=1)
    assert "round-deadline-s" in str(info.value)
    assert [(r.round, r.attempt, r.version_id) for r in reports] == [(1, 0, None), (1, 1, None)]
    first, retry = reports
    assert [o.client_id for o in first.accepted] == ["client-0"]  # the timely client, in time
    assert len(_timeouts(first)) == 2  # both stragglers missed the deadline
    # the retry sends fresh messages (its own deadline); the stragglers miss it again
    assert len(retry.outcomes) == NODES and len(_timeouts(retry)) == 2
    assert {o.client_id for o in retry.accepted} <= {"client-0"}
    with ModelStore.open(store) as st:
        assert [v.id for v in st.list()] == ["v000001"]  # only the base: nothing was committed
        assert st.verify().ok
