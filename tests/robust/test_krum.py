"""Krum / multi-Krum against a plain transcription of Blanchard et al. 2017, Algorithm (Krum)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedmerge.aggregators import create, merge
from fedmerge.errors import AggregatorStateError, ConfigError

Honest = Callable[..., list[dict[str, torch.Tensor]]]


def plain_krum_scores(deltas: list[dict[str, torch.Tensor]], f: int) -> list[float]:
    flat = [torch.cat([d[k].reshape(-1).double() for k in sorted(d)]) for d in deltas]
    n = len(flat)
    scores = []
    for i in range(n):
        dists = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return scores


def plain_multi_krum(deltas: list[dict[str, torch.Tensor]], f: int, m: int) -> dict[str, torch.Tensor]:
    scores = plain_krum_scores(deltas, f)
    best = sorted(range(len(deltas)), key=lambda i: scores[i])[:m]
    return {k: torch.stack([deltas[i][k].float() for i in best]).mean(0) for k in deltas[0]}


@pytest.mark.parametrize(("n", "f"), [(5, 1), (9, 3), (11, 2)])
def test_krum_and_multi_krum_equal_the_plain_algorithm(honest: Honest, n: int, f: int) -> None:
    ds = honest(n, seed=n)
    agg = create("krum", num_byzantine=f)
    agg.begin({k: v.shape for k, v in ds[0].items()})
    for i, d in enumerate(ds):
        agg.add(d, client_id=i)
    out = agg.finalize()
    ref = plain_multi_krum(ds, f, 1)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    assert list(agg.scores.values()) == pytest.approx(plain_krum_scores(ds, f), rel=1e-9)  # type: ignore[attr-defined]
    for m in (2, n - f):
        multi = merge("multi_krum", ds, num_byzantine=f, num_selected=m)
        ref = plain_multi_krum(ds, f, m)
        for k in ref:
            torch.testing.assert_close(multi[k], ref[k])


def test_krum_never_selects_an_outlying_attacker(honest: Honest) -> None:
    ds = honest(7, seed=1)
    attackers = [{k: -5 * v for k, v in ds[0].items()}, {k: 50 * v for k, v in ds[1].items()}]
    agg = create("multi_krum", num_byzantine=2)
    agg.begin({k: v.shape for k, v in ds[0].items()})
    for i, d in enumerate(ds + attackers):
        agg.add(d, weight=1000.0 if i >= 7 else 1.0, client_id=f"c{i}")  # weights cannot buy selection
    agg.finalize()
    assert set(agg.selected).isdisjoint({"c7", "c8"})  # type: ignore[attr-defined]
    assert len(agg.selected) == 7  # type: ignore[attr-defined]


def test_the_default_f_is_the_largest_the_guarantee_allows(honest: Honest) -> None:
    ds = honest(9, seed=2)
    assert merge("krum", ds)["w"].equal(merge("krum", ds, num_byzantine=3)["w"])
    assert merge("multi_krum", ds)["w"].equal(merge("multi_krum", ds, num_byzantine=3)["w"])


def test_too_few_clients_for_f_is_an_error_naming_the_bound(honest: Honest) -> None:
    with pytest.raises(AggregatorStateError, match=r"n ≥ 2f \+ 3 = 7 clients, got 6"):
        merge("krum", honest(6), num_byzantine=2)
    with pytest.raises(ConfigError, match="num_byzantine"):
        create("krum", num_byzantine=-1)
    with pytest.raises(ConfigError, match="num_selected"):
        create("multi_krum", num_selected=0)
