"""Injected client faults (``fault-dropout``, ``fault-straggler``): seeded draws, and rounds that record
the failures with their reasons and still commit when ``min-valid`` is met."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp

from fedmerge.errors import ConfigError
from fedmerge.flower.client.faults import FaultPlan, InjectedDropout, draw_faults, inject_faults
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]


def test_draws_are_a_pure_function_of_seed_round_and_partition() -> None:
    plan = FaultPlan(dropout=0.5, straggler=0.5, delay_s=1.0)
    first = [draw_faults(plan, 3, r, p) for r in range(1, 4) for p in range(20)]
    again = [draw_faults(plan, 3, r, p) for r in range(1, 4) for p in range(20)]
    other_seed = [draw_faults(plan, 4, r, p) for r in range(1, 4) for p in range(20)]
    assert first == again
    assert first != other_seed
    assert not any(d.drop and d.straggle for d in first)


def test_dropout_frequency_matches_the_probability() -> None:
    plan = FaultPlan(dropout=0.3)
    drops = sum(draw_faults(plan, 0, r, p).drop for r in range(50) for p in range(40))
    assert 0.26 < drops / 2000 < 0.34  # binomial(2000, 0.3): ± 4 standard deviations
    assert not any(draw_faults(FaultPlan(), 0, r, p).drop for r in range(5) for p in range(20))
    assert all(draw_faults(FaultPlan(dropout=1.0), 0, r, p).drop for r in range(5) for p in range(20))


def test_inject_raises_on_dropout_and_sleeps_for_a_straggler() -> None:
    with pytest.raises(InjectedDropout, match=r"partition 7 does not reply in round 2 \(fault-dropout=1"):
        inject_faults(FaultPlan(dropout=1.0), 0, 2, 7)
    slept: list[float] = []
    draw = inject_faults(FaultPlan(straggler=1.0, delay_s=2.5), 0, 1, 0, sleep=slept.append)
    assert draw.straggle and slept == [2.5]
    assert not inject_faults(FaultPlan(), 0, 1, 0, sleep=slept.append).straggle
    assert slept == [2.5]


def test_plan_travels_in_the_train_config_only_when_active() -> None:
    assert FaultPlan().to_record() == {}
    plan = FaultPlan(0.25, 0.5, 3.0)
    assert FaultPlan.from_record(plan.to_record()) == plan
    assert FaultPlan.from_record({}) == FaultPlan()


def test_out_of_range_fault_keys_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config({"fault-dropout": 1.5, "fault-straggler": -0.1, "fault-straggler-delay-s": -2})
    message = str(info.value)
    assert "fault-dropout=1.5 must be in [0, 1]" in message
    assert "fault-straggler=-0.1 must be in [0, 1]" in message
    assert "fault-straggler-delay-s=-2.0 must be ≥ 0" in message


def _seed_with_drops(plan: FaultPlan, round_: int, partitions: int, low: int, high: int) -> int:
    """The first seed whose round drops between ``low`` and ``high`` partitions (a pure search)."""
    for seed in range(1000):
        dropped = sum(draw_faults(plan, seed, round_, p).drop for p in range(partitions))
        if low <= dropped <= high:
            return seed
    raise AssertionError("no seed found")


def test_dropout_half_records_failures_and_still_commits(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    plan = FaultPlan(dropout=0.5)
    n = 6
    seed = _seed_with_drops(plan, 1, n, 2, 3)
    dropped = {p for p in range(n) if draw_faults(plan, seed, 1, p).drop}
    store = tmp_path / "store"
    reports = simulate(
        store, scripted_client_app(["ok"] * n), n, min_clients=n, min_valid=2, seed=seed, fault_dropout=0.5
    )
    assert [r.version_id for r in reports] == ["v000002"]
    with ModelStore.open(store) as st:
        version = st.get("latest")
        accepted = sorted(c.client_id for c in version.contributors if c.accepted)
        rejected = [c for c in version.contributors if not c.accepted]
        assert accepted == sorted(f"client-{p}" for p in range(n) if p not in dropped)
        assert len(rejected) == len(dropped)
        for c in rejected:
            assert c.reason is not None and "injected dropout" in c.reason and "fault-dropout=0.5" in c.reason
        assert version.metrics["rejected"] == float(len(dropped))
        assert st.verify().ok
