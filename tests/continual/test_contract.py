"""The contract every continual merger keeps: validation, exact restore, constant memory, registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge.aggregators.continual import available_continual, create_continual
from fedmerge.errors import (
    AggregatorStateError,
    ConfigError,
    IncompatibleDeltasError,
    InvalidSubmission,
    UnknownAggregatorError,
)

METHODS = ["opcm", "continual_task_arithmetic", "continual_ties", "magmax", "running_average"]


def random_expert(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(11, 6, generator=g),
        "fc1.weight": torch.randn(12, 6, generator=g),
        "fc1.bias": torch.randn(12, generator=g),
        "norm.weight": torch.randn(12, generator=g),
        "fc2.weight": torch.randn(5, 12, generator=g),
        "fc2.bias": torch.randn(5, generator=g),
    }


def test_registry_lists_every_method() -> None:
    assert available_continual() == sorted(METHODS)
    with pytest.raises(UnknownAggregatorError, match="no continual merger named 'nope'"):
        create_continual("nope")
    with pytest.raises(ConfigError, match="does not take"):
        create_continual("running_average", scaling=2.0)


@pytest.mark.parametrize("name", METHODS)
def test_restore_through_safetensors_continues_bit_identically(
    name: str, experts: list[dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    straight = create_continual(name)
    for tau in experts:
        expected = straight.add_expert(tau)
    first = create_continual(name)
    for tau in experts[:3]:
        first.add_expert(tau)
    save_file(first.state_dict(), str(tmp_path / "state.safetensors"))
    del first
    resumed = create_continual(name)
    resumed.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    assert resumed.num_merged == 3
    for tau in experts[3:]:
        got = resumed.add_expert(tau)
    assert resumed.num_merged == len(experts)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("name", METHODS)
def test_state_size_is_constant_in_the_number_of_experts(name: str) -> None:
    merger = create_continual(name)
    sizes = {}
    for t in range(1, 13):
        merger.add_expert(random_expert(t))
        if t in (2, 12):
            state = merger.state_dict()
            sizes[t] = (len(state), sum(v.numel() * v.element_size() for v in state.values()))
    assert sizes[2] == sizes[12]


@pytest.mark.parametrize("name", METHODS)
def test_state_and_results_do_not_alias_inputs_or_outputs(name: str) -> None:
    merger = create_continual(name)
    a, b, c = random_expert(1), random_expert(2), random_expert(3)
    merger.add_expert(a)
    out = merger.add_expert(b)
    reference = create_continual(name)
    reference.add_expert(random_expert(1))
    reference.add_expert(random_expert(2))
    for t in (a, b, out):  # callers may reuse or modify their tensors
        for v in t.values():
            v.fill_(123.0)
    got, expected = merger.add_expert(c), reference.add_expert(c)
    assert all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("name", METHODS)
def test_half_precision_inputs_are_computed_in_fp32(name: str) -> None:
    experts = [{k: v.to(torch.bfloat16) for k, v in random_expert(i).items()} for i in range(3)]
    half, full = create_continual(name), create_continual(name)
    for tau in experts:
        a = half.add_expert(tau)
        b = full.add_expert({k: v.float() for k, v in tau.items()})
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", METHODS)
def test_bad_experts_are_rejected_with_the_tensor_named(name: str) -> None:
    merger = create_continual(name)
    merger.add_expert(random_expert(0))
    bad = random_expert(1)
    bad["fc1.weight"] = torch.zeros(6, 12)
    with pytest.raises(IncompatibleDeltasError, match=r"fc1\.weight"):
        merger.add_expert(bad)
    nan = random_expert(1)
    nan["fc2.bias"][2] = float("nan")
    with pytest.raises(InvalidSubmission, match=r"fc2\.bias.*NaN"):
        merger.add_expert(nan)
    ints = random_expert(1)
    ints["norm.weight"] = torch.ones(12, dtype=torch.int64)
    with pytest.raises(InvalidSubmission, match=r"norm\.weight.*floating"):
        merger.add_expert(ints)
    missing = random_expert(1)
    del missing["embed.weight"]
    with pytest.raises(IncompatibleDeltasError, match=r"embed\.weight"):
        merger.add_expert(missing)
    assert merger.num_merged == 1  # nothing rejected was merged
    with pytest.raises(InvalidSubmission, match="empty"):
        merger.add_expert({})


@pytest.mark.parametrize("name", METHODS)
def test_merged_before_any_expert_is_an_error(name: str) -> None:
    with pytest.raises(AggregatorStateError, match="before any add_expert"):
        create_continual(name).merged()


def test_empty_state_round_trips() -> None:
    fresh = create_continual("opcm").state_dict()
    again = create_continual("opcm")
    again.load_state_dict(fresh)
    assert again.num_merged == 0


def test_state_of_another_method_or_incomplete_state_is_refused() -> None:
    ta = create_continual("continual_task_arithmetic")
    ta.add_expert(random_expert(0))
    with pytest.raises(AggregatorStateError, match="written by 'continual_task_arithmetic'"):
        create_continual("running_average").load_state_dict(ta.state_dict())
    opcm = create_continual("opcm")
    opcm.add_expert(random_expert(0))
    state = opcm.state_dict()
    del state["meta/lambda"]
    with pytest.raises(AggregatorStateError, match="meta/lambda"):
        create_continual("opcm").load_state_dict(state)
    state = opcm.state_dict()
    state["other/fc1.weight"] = torch.zeros(12, 6)
    with pytest.raises(AggregatorStateError, match=r"other/fc1\.weight"):
        create_continual("opcm").load_state_dict(state)
