"""bench.timing: interleaving order, best-of-k, and the bandwidth fraction bounded by 1.0.

No wall-clock assertion: the callables record their call order and the times fed to the fraction are
given, so every check is deterministic."""

from __future__ import annotations

import math

import pytest

from fedmerge_bench import timing


def test_interleaved_alternates_and_keeps_the_minimum() -> None:
    calls: list[str] = []
    pair = timing.interleaved(lambda: calls.append("o"), lambda: calls.append("r"), 4)
    assert calls == ["o", "r", "o", "r", "r", "o", "o", "r", "r", "o"]  # warm-up, then alternating order
    assert len(pair.ours_all) == len(pair.ref_all) == 4
    assert pair.ours_s == min(pair.ours_all) and pair.ref_s == min(pair.ref_all)
    assert pair.speedup == pair.ref_s / pair.ours_s


def test_sync_wraps_every_timed_call() -> None:
    events: list[str] = []
    timing.interleaved(lambda: events.append("o"), lambda: events.append("r"), 1,
                       sync=lambda: events.append("s"), warmup=False)  # fmt: skip
    assert events == ["s", "o", "s", "s", "r", "s"]


def test_best_of_counts_calls() -> None:
    n = [0]

    def fn() -> None:
        n[0] += 1

    t = timing.best_of(fn, 3)
    assert n[0] == 4 and t >= 0.0
    with pytest.raises(ValueError, match="k must be at least 1"):
        timing.best_of(fn, 0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        timing.interleaved(fn, fn, 0)


@pytest.mark.parametrize(("method_s", "ref_s"), [(2.0, 1.0), (1.0, 1.0), (1.0, 3.0), (0.5, 0.49)])
def test_fraction_never_exceeds_one(method_s: float, ref_s: float) -> None:
    f = timing.fraction_of_bandwidth(method_s, ref_s)
    assert 0.0 < f.value <= 1.0
    assert f.value == pytest.approx(min(method_s, ref_s) / method_s)
    assert f.reference_was_slower == (ref_s > method_s)


def test_fraction_refuses_non_positive_times() -> None:
    with pytest.raises(ValueError, match="times must be positive"):
        timing.fraction_of_bandwidth(0.0, 1.0)


def test_load_line_names_the_cpus() -> None:
    one, five, fifteen = timing.load_average()
    assert all(math.isnan(x) or x >= 0 for x in (one, five, fifteen))
    assert "CPUs" in timing.load_line()
