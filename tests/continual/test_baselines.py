"""The baselines against closed forms, the batch aggregators and hand-computed TIES steps."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import merge
from fedmerge.aggregators.continual import create_continual
from fedmerge.aggregators.continual.continual_ties import ties_pair, trim_all
from fedmerge.errors import ConfigError


def test_task_arithmetic_is_scaled_sum(experts: list[dict[str, torch.Tensor]]) -> None:
    m = create_continual("continual_task_arithmetic", scaling=0.3)
    for tau in experts:
        out = m.add_expert(tau)
    for k in out:
        torch.testing.assert_close(out[k], 0.3 * sum(e[k] for e in experts))


def test_running_average_is_mean(experts: list[dict[str, torch.Tensor]]) -> None:
    m = create_continual("running_average")
    for t, tau in enumerate(experts, 1):
        out = m.add_expert(tau)
        for k in out:
            torch.testing.assert_close(out[k], torch.stack([e[k] for e in experts[:t]]).mean(0))


def test_sequential_magmax_equals_batch_magmax_in_any_order(experts: list[dict[str, torch.Tensor]]) -> None:
    batch = merge("magmax", experts, scaling=0.5)
    for order in (experts, experts[::-1]):
        m = create_continual("magmax", scaling=0.5)
        for tau in order:
            out = m.add_expert(tau)
        assert all(torch.equal(out[k], batch[k]) for k in out)


def test_ties_pair_by_hand_without_trim() -> None:
    a = {"w": torch.tensor([3.0, -1.0, 2.0, 0.0, 1.0])}
    b = {"w": torch.tensor([-1.0, -2.0, -2.0, 0.0, 4.0])}
    # a+b = [2, -3, 0, 0, 5] → γ = [+, -, 0→maj, 0→maj, +]; Σγ = +1 → majority +
    out = ties_pair(a, b, density=1.0, scope="global")
    torch.testing.assert_close(out["w"], torch.tensor([3.0, -3.0, 2.0, 0.0, 5.0]))


def test_trim_keeps_top_fraction_globally_or_per_tensor() -> None:
    tv = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, -2.0, 3.0, -4.0])}
    g = trim_all(tv, 0.25, "global")  # k = 2 of 8: 10 and 9
    assert g["a"].tolist() == [10.0, 9.0, 0.0, 0.0] and g["b"].tolist() == [0.0] * 4
    t = trim_all(tv, 0.25, "tensor")  # k = 1 per tensor
    assert t["a"].tolist() == [10.0, 0.0, 0.0, 0.0] and t["b"].tolist() == [0.0, 0.0, 0.0, -4.0]


def test_continual_ties_steps() -> None:
    a = {"w": torch.tensor([3.0, -1.0, 2.0, 0.0, 1.0])}
    b = {"w": torch.tensor([-1.0, -2.0, -2.0, 0.0, 4.0])}
    m = create_continual("continual_ties", scaling=0.5, density=1.0)
    assert m.add_expert(a)["w"].tolist() == [1.5, -0.5, 1.0, 0.0, 0.5]
    # TIES(merged, b): sum = [.5, -2.5, -1, 0, 4.5] → γ = [+, -, -, 0, +]; the zero vote takes sgn(Σγ) = 0
    # kept: [1.5 (b's -1 disagrees), -0.5 - 2, -2 (merged's +1 disagrees), 0, 0.5 + 4]
    out = m.add_expert(b)["w"]
    expected_update = torch.tensor([1.5, -2.5, -2.0, 0.0, 4.5])
    torch.testing.assert_close(out, torch.tensor([1.5, -0.5, 1.0, 0.0, 0.5]) + 0.5 * expected_update)


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"density": 0.0}, "density"),
        ({"trim_scope": "row"}, "trim_scope"),
        ({"scaling": float("inf")}, "scaling"),
    ],
)
def test_ties_config_errors(params: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        create_continual("continual_ties", **params)
