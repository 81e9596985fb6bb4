"""Norm bounding: equals the inner method on pre-clipped deltas, and bounds a scaling attacker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedmerge.aggregators import create, merge
from fedmerge.delta import SparseTensor
from fedmerge.delta.state_dict import global_norm
from fedmerge.errors import ConfigError, InvalidSubmission
from fedmerge.privacy import clip_delta

Honest = Callable[..., list[dict[str, torch.Tensor]]]


@pytest.mark.parametrize(
    ("inner", "inner_params"),
    [("fedavg", {}), ("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.3}), ("dare_ties", {})],
)
def test_equals_the_inner_method_on_clipped_deltas(
    honest: Honest, inner: str, inner_params: dict[str, object]
) -> None:
    ds = honest(6, seed=3)
    ws = [1.0, 2.0, 3.0, 1.0, 1.0, 2.0]
    out = merge("norm_bounded", ds, ws, inner=inner, max_norm=4.0, inner_params=inner_params, seed=5)
    clipped = [clip_delta(d, 4.0)[0] for d in ds]
    ref = merge(inner, clipped, ws, seed=5, **inner_params)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])


def test_a_scaled_attacker_is_bounded(honest: Honest) -> None:
    ds = honest(9, seed=4)
    honest_mean = merge("fedavg", ds)
    bound = max(global_norm(d) for d in ds)
    attacker = {k: -100 * v for k, v in ds[0].items()}
    agg = create("norm_bounded", max_norm=bound)
    agg.begin({k: v.shape for k, v in ds[0].items()})
    for i, d in enumerate([*ds, attacker]):
        agg.add(d, client_id=f"c{i}")
    bounded = agg.finalize()
    plain = merge("fedavg", [*ds, attacker])
    shift = {k: bounded[k] - honest_mean[k] for k in bounded}
    assert global_norm(shift) <= 2 * bound / 10 + 1e-4  # one clipped client moves the mean by ≤ 2M/N
    assert global_norm({k: plain[k] - honest_mean[k] for k in plain}) > 5 * global_norm(shift)
    assert agg.client_norms["c9"] == pytest.approx(100 * global_norm(ds[0]), rel=1e-6)  # type: ignore[attr-defined]


def test_sparse_clients_are_clipped_by_their_values(honest: Honest) -> None:
    ds = honest(3, seed=5)
    sparse = [
        {k: SparseTensor.from_dense(torch.where(v > 0, v, torch.zeros(()))) for k, v in d.items()} for d in ds
    ]
    dense = [{k: v.to_dense() for k, v in d.items()} for d in sparse]
    a = merge("norm_bounded", sparse, max_norm=1.0)
    b = merge("norm_bounded", dense, max_norm=1.0)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_configuration_and_input_errors(honest: Honest) -> None:
    with pytest.raises(ConfigError, match="streaming inner"):
        create("norm_bounded", inner="median")
    with pytest.raises(ConfigError, match="max_norm"):
        create("norm_bounded", max_norm=0.0)
    with pytest.raises(ConfigError, match="density"):
        create("norm_bounded", inner="ties", inner_params={"density": 2.0})
    ds = honest(2)
    ds[1]["b"][0] = float("nan")
    with pytest.raises(InvalidSubmission, match="'b' holds NaN"):
        merge("norm_bounded", ds)
    params = create("norm_bounded", inner="ties", max_norm=3.0).params
    assert (
        params["inner"] == "ties" and params["max_norm"] == 3.0 and params["inner_params"]["density"] == 0.2
    )
