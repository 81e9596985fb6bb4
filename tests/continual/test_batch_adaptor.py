"""Continual mergers that are batch aggregators plus state: equal to the batch merge, declared
defaults, state compatible with what the code before the adaptor wrote, transactional rollback."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedmerge.aggregators import Aggregator, get, merge
from fedmerge.aggregators.continual import (
    BatchContinual,
    available_continual,
    create_continual,
    get_continual,
)
from fedmerge.aggregators.magmax import MagMax
from fedmerge.aggregators.task_arithmetic import TaskArithmetic
from fedmerge.errors import AggregatorStateError, ConfigError
from fedmerge.submission import NonFiniteMerge

FIXTURE = Path(__file__).parent / "data" / "state_format1.safetensors"
ADAPTED = sorted(n for n in available_continual() if issubclass(get_continual(n), BatchContinual))
SHAPES = {"w": (7, 5), "b": (5,), "e": (3, 2, 2)}


def experts(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]
    out[1]["b"] = -out[0]["b"]  # equal magnitudes, opposite signs: MagMax's tie rule is exercised
    out[2]["w"][0] = 0.0
    return out


def batch_of(name: str) -> type[Aggregator]:
    cls = get_continual(name)
    assert issubclass(cls, BatchContinual)
    return cls.aggregator


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_adapted_methods_are_task_arithmetic_and_magmax() -> None:
    assert ADAPTED == ["continual_task_arithmetic", "magmax"]
    assert batch_of("continual_task_arithmetic") is TaskArithmetic
    assert batch_of("magmax") is MagMax
    for name in ("continual_ties", "opcm", "running_average"):  # their own arithmetic (docs/continual.md)
        assert not issubclass(get_continual(name), BatchContinual)


@pytest.mark.parametrize("name", ADAPTED)
@pytest.mark.parametrize("scaling", [None, 0.7])
def test_adaptor_equals_the_batch_merge_of_the_experts_so_far_in_every_order(
    name: str, scaling: float | None
) -> None:
    params = {} if scaling is None else {"scaling": scaling}
    batch_name = batch_of(name).name
    batch_params = {**get(batch_name).continual_defaults, **params}
    taus = experts(4, seed=11)
    for order in itertools.permutations(range(4)):
        merger = create_continual(name, **params)
        for t in range(1, 5):
            got = merger.add_expert(taus[order[t - 1]])
            expected = merge(batch_name, [taus[i] for i in order[:t]], **batch_params)
            assert same(got, expected), (order, t)
            assert same(merger.merged(), expected)


def test_magmax_equals_batch_magmax_whatever_the_order() -> None:
    taus = experts(5, seed=3)
    expected = merge("magmax", taus, scaling=0.5)
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        merger = create_continual("magmax")
        for i in order:
            got = merger.add_expert(taus[i])
        assert same(got, expected)


def test_continual_defaults_are_declared_once_on_the_batch_class() -> None:
    assert MagMax.continual_defaults == {"scaling": 0.5} and MagMax().scaling == 1.0
    assert TaskArithmetic.continual_defaults == {"scaling": 0.3} and TaskArithmetic().scaling == 1.0
    assert create_continual("magmax").params == {"scaling": 0.5}
    assert create_continual("continual_task_arithmetic").params == {"scaling": 0.3}
    assert create_continual("magmax", scaling=2).params == {"scaling": 2.0}


@pytest.mark.parametrize("name", ADAPTED)
def test_only_the_declared_parameters_are_taken(name: str) -> None:
    with pytest.raises(ConfigError, match="does not take"):
        create_continual(name, normalize=True)
    with pytest.raises(ConfigError, match="scaling"):
        create_continual(name, scaling=float("nan"))
    with pytest.raises(ConfigError, match="scaling"):
        create_continual(name, scaling="x")


def test_running_average_is_fedavg_with_unit_weights_up_to_rounding() -> None:
    taus = experts(6, seed=5)
    merger = create_continual("running_average")
    for t, tau in enumerate(taus, 1):
        got = merger.add_expert(tau)
        expected = merge("fedavg", taus[:t])
        for k in got:
            torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------- state written before the adaptor
def fixture_cases() -> dict[str, tuple[str, dict[str, Any]]]:
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    return {k: (m, p) for k, (m, p) in json.loads(meta["cases"]).items()}


SVD_METHODS = {"opcm"}  # adding an expert takes an SVD of each matrix


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", sorted(fixture_cases()))
def test_a_state_written_before_the_adaptor_resumes_to_the_same_results(case: str) -> None:
    method, params = fixture_cases()[case]
    stored = load_file(str(FIXTURE))
    state = prefixed(stored, f"{case}/state/")
    merger = create_continual(method, **params)
    merger.load_state_dict(state)
    assert merger.num_merged == 3
    again = merger.state_dict()  # the layout is unchanged: the same keys and bits come back
    assert same(again, state)
    assert same(merger.merged(), prefixed(stored, f"{case}/merged_3/"))
    for i in (3, 4):
        merger.add_expert(prefixed(stored, f"expert/{i}/"))
    merged, expected = merger.merged(), prefixed(stored, f"{case}/merged_5/")
    if method in SVD_METHODS:
        # LAPACK's SVD takes instruction-set-specific paths: bit-identical on one machine, not across
        # CPUs (the fixture was written on another); the state's layout above is still bit-exact
        assert merged.keys() == expected.keys()
        for k in merged:
            torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-5)
    else:
        assert same(merged, expected)


def test_the_fixture_covers_every_method() -> None:
    assert {m for m, _ in fixture_cases().values()} == set(available_continual())


@pytest.mark.parametrize("name", ADAPTED)
def test_state_round_trips_at_every_step(name: str) -> None:
    fresh = create_continual(name)
    empty = create_continual(name)
    empty.load_state_dict(fresh.state_dict())
    assert empty.num_merged == 0
    taus = experts(4, seed=2)
    straight = create_continual(name)
    for t, tau in enumerate(taus):
        expected = straight.add_expert(tau)
        resumed = create_continual(name)
        resumed.load_state_dict(straight.state_dict())
        assert resumed.num_merged == t + 1 and same(resumed.merged(), expected)
        assert same(resumed.state_dict(), straight.state_dict())
    state = straight.state_dict()
    state["sum/w" if name == "continual_task_arithmetic" else "maxabs/w"] = torch.zeros(
        7, 5, dtype=torch.float64
    )
    with pytest.raises(AggregatorStateError, match="fp32"):
        create_continual(name).load_state_dict(state)


# ---------------------------------------------------------------------- transactional add_expert
@pytest.mark.parametrize("name", ADAPTED)
@pytest.mark.parametrize("before", [0, 2])
def test_a_fold_failing_half_way_leaves_the_state_as_it_was(
    name: str, before: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    taus = experts(5, seed=9)
    merger, reference = create_continual(name), create_continual(name)
    for tau in taus[:before]:
        merger.add_expert(tau)
        reference.add_expert(tau)
    state = merger.state_dict()
    cls = batch_of(name)
    fold = cls._fold_dense
    calls: list[str] = []

    def failing(self: Any, key: str, items: Any, weights: Any) -> None:
        fold(self, key, items, weights)  # the accumulators of the first tensor are changed...
        calls.append(key)
        if len(calls) == 2:
            raise RuntimeError("disk full")  # ...then the fold fails half-way

    monkeypatch.setattr(cls, "_fold_dense", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        merger.add_expert(taus[before])
    monkeypatch.setattr(cls, "_fold_dense", fold)
    assert merger.num_merged == before and same(merger.state_dict(), state)
    if before == 0:
        with pytest.raises(AggregatorStateError, match="before any add_expert"):
            merger.merged()
    for tau in taus[before:]:
        assert same(merger.add_expert(tau), reference.add_expert(tau))


def test_a_merge_that_overflows_is_rolled_back() -> None:
    merger = create_continual("continual_task_arithmetic", scaling=1e38)
    ones = {k: torch.ones(s) for k, s in SHAPES.items()}
    merger.add_expert(ones)
    before = merger.state_dict()
    with pytest.raises(NonFiniteMerge, match="NaN or infinite"):
        merger.add_expert({k: 3 * v for k, v in ones.items()})  # λ·(1 + 3) > FP32_MAX
    assert merger.num_merged == 1 and same(merger.state_dict(), before)
    out = merger.add_expert({k: -0.5 * v for k, v in ones.items()})
    assert all(torch.equal(v, torch.full_like(v, 0.5 * 1e38)) for v in out.values())
