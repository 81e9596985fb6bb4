"""Clipping: the bound holds, the direction is kept, small deltas pass untouched, bad input is named."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from fedmerge.aggregators.sparsify import trim
from fedmerge.delta import SparseTensor
from fedmerge.delta.state_dict import global_norm
from fedmerge.errors import ConfigError, InvalidSubmission
from fedmerge.privacy import clip_delta, cosine, delta_norm

MakeDelta = Callable[..., dict[str, torch.Tensor]]


def test_clipped_norm_is_min_of_norm_and_bound_over_many_deltas(make_delta: MakeDelta) -> None:
    gen = torch.Generator().manual_seed(1)
    bound = 5.0
    for i in range(200):
        scale = float(torch.empty(()).uniform_(0.01, 2.0, generator=gen))
        d = make_delta(i, scale)
        clipped, norm = clip_delta(d, bound)
        assert norm == pytest.approx(global_norm(d), rel=1e-12)
        assert delta_norm(clipped) == pytest.approx(min(norm, bound), rel=1e-6)
        assert delta_norm(clipped) <= bound * (1 + 1e-6)
        assert cosine(clipped, d) == pytest.approx(1.0, abs=1e-6)


def test_a_delta_within_the_bound_is_returned_as_is(delta: dict[str, torch.Tensor]) -> None:
    clipped, norm = clip_delta(delta, 1e6)
    assert all(clipped[k] is delta[k] for k in delta)
    assert norm == pytest.approx(global_norm(delta))


def test_the_clip_factor_is_exact(delta: dict[str, torch.Tensor]) -> None:
    norm = global_norm(delta)
    clipped, _ = clip_delta(delta, norm / 4)
    for k in delta:
        torch.testing.assert_close(clipped[k], delta[k] / 4, rtol=1e-6, atol=0)


def test_sparse_and_dense_clip_the_same(delta: dict[str, torch.Tensor]) -> None:
    sparse = {
        k: SparseTensor.from_dense(torch.where(v.abs() > 1, v, torch.zeros(()))) for k, v in delta.items()
    }
    dense = {k: v.to_dense() for k, v in sparse.items()}
    cs, ns = clip_delta(sparse, 2.0)
    cd, nd = clip_delta(dense, 2.0)
    assert ns == pytest.approx(nd, rel=1e-12)
    for k in dense:
        s = cs[k]
        assert isinstance(s, SparseTensor)
        torch.testing.assert_close(s.to_dense(), cd[k])


def test_low_precision_inputs_come_back_in_fp32(delta: dict[str, torch.Tensor]) -> None:
    half = {k: v.to(torch.bfloat16) for k, v in delta.items()}
    clipped, _ = clip_delta(half, 1.0)
    assert all(v.dtype == torch.float32 for v in clipped.values())
    assert delta_norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_sparsifying_after_clipping_keeps_the_bound(delta: dict[str, torch.Tensor]) -> None:
    clipped, _ = clip_delta(delta, 3.0)
    trimmed = {k: trim(v, 0.1) for k, v in clipped.items()}
    assert delta_norm(trimmed) <= 3.0 * (1 + 1e-6)


def test_zero_delta_stays_zero() -> None:
    zero = {"w": torch.zeros(10)}
    clipped, norm = clip_delta(zero, 1.0)
    assert norm == 0.0 and delta_norm(clipped) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected_naming_the_tensor(delta: dict[str, torch.Tensor], bad: float) -> None:
    delta["layer.bias"][3] = bad
    with pytest.raises(InvalidSubmission, match=r"'layer\.bias' holds NaN or Inf"):
        clip_delta(delta, 1.0)


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
def test_bad_bounds_are_rejected(delta: dict[str, torch.Tensor], bound: float) -> None:
    with pytest.raises(ConfigError, match="max_norm"):
        clip_delta(delta, bound)
