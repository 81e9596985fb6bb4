"""Anomaly scores flag sign-flip and scaling clients; automatic rejection recovers the honest merge."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedmerge.aggregators import merge
from fedmerge.errors import ConfigError
from fedmerge.privacy import anomaly_scores, merge_with_rejection, robust_z

MakeDelta = Callable[..., dict[str, torch.Tensor]]


def _federation(make_delta: MakeDelta) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    common = make_delta(100)
    honest = {f"h{i}": {k: v + 0.3 * make_delta(i)[k] for k, v in common.items()} for i in range(8)}
    clients = dict(honest)
    clients["flip"] = {k: -v for k, v in honest["h0"].items()}
    clients["scale"] = {k: 20 * v for k, v in honest["h1"].items()}
    return clients, merge("fedavg", list(honest.values()))


def test_attackers_are_scored_and_rejected(make_delta: MakeDelta) -> None:
    clients, _ = _federation(make_delta)
    agg = merge("median", list(clients.values()))
    scores = anomaly_scores(clients, agg, max_norm_score=6.0, min_cosine=0.0)
    assert scores["flip"]["cosine"] < -0.9 and scores["flip"]["rejected"]
    assert scores["scale"]["norm_score"] > 50 and scores["scale"]["rejected"]
    assert "robust σ" in scores["scale"]["reasons"][0]
    assert not any(scores[f"h{i}"]["rejected"] for i in range(8))
    assert all(scores[f"h{i}"]["cosine"] > 0.9 for i in range(8))


def test_merge_with_rejection_recovers_the_honest_mean(make_delta: MakeDelta) -> None:
    clients, honest_mean = _federation(make_delta)
    merged, scores = merge_with_rejection("median", clients, max_norm_score=6.0, min_cosine=0.0)
    assert {c for c, s in scores.items() if s["rejected"]} == {"flip", "scale"}
    for k in honest_mean:
        torch.testing.assert_close(merged[k], merge("median", [clients[f"h{i}"] for i in range(8)])[k])
    # with FedAvg the scaled client drags the first pass, yet the norm test removes both attackers
    fedavg, fscores = merge_with_rejection("fedavg", clients, max_norm_score=6.0, min_cosine=0.0)
    assert {c for c, s in fscores.items() if s["rejected"]} == {"flip", "scale"}
    for k in honest_mean:
        torch.testing.assert_close(fedavg[k], honest_mean[k])


def test_norms_only_give_norm_scores_without_cosine() -> None:
    scores = anomaly_scores({"a": 1.0, "b": 1.1, "c": 0.9, "d": 30.0}, max_norm_score=5.0)
    assert scores["d"]["rejected"] and not scores["a"]["rejected"]
    assert scores["a"]["cosine"] is None


def test_robust_z_of_equal_values_is_zero() -> None:
    assert robust_z([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        anomaly_scores({})
    with pytest.raises(ConfigError, match="min_cosine"):
        anomaly_scores({"a": 1.0}, min_cosine=2.0)
    with pytest.raises(ConfigError, match="norm must be finite"):
        anomaly_scores({"a": float("nan")})
    with pytest.raises(ConfigError, match="every one of the 2 clients"):
        merge_with_rejection(
            "fedavg", {"a": {"w": torch.ones(3)}, "b": {"w": -torch.ones(3)}}, min_cosine=0.5
        )


def test_cosine_against_a_prepared_reference_is_bit_identical(make_delta: MakeDelta) -> None:
    from fedmerge.delta.sparse import SparseTensor
    from fedmerge.privacy.anomaly import CosineReference, cosine

    aggregate, prepared = make_delta(1), CosineReference(make_delta(1))
    for seed in (2, 3, 4):
        dense = make_delta(seed)
        sparse = {k: SparseTensor.from_dense(torch.where(v.abs() > 0.5, v, 0.0)) for k, v in dense.items()}
        for delta in (dense, sparse):
            assert cosine(delta, prepared) == cosine(delta, aggregate)  # exactly: same order, same sums
    assert cosine(make_delta(5), prepared) != cosine(make_delta(6), prepared)
    assert cosine({k: torch.zeros_like(v) for k, v in aggregate.items()}, prepared) == 0.0
