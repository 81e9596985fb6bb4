"""Robust TIES against a plain per-coordinate transcription, and its resistance to scaling and sign flips."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pytest
import torch

from fedmerge.aggregators import create, merge
from fedmerge.delta.state_dict import global_norm

Honest = Callable[..., list[dict[str, torch.Tensor]]]


def plain_robust_ties(deltas: list[dict[str, torch.Tensor]], density: float) -> dict[str, torch.Tensor]:
    norms = [global_norm(d) for d in deltas]
    m = statistics.median(norms)
    out = {}
    for key in deltas[0]:
        rows = []
        for d, n in zip(deltas, norms, strict=True):
            x = d[key].reshape(-1).double() * (m / n if n > 0 else 1.0)
            k = int(density * x.numel())
            keep = torch.zeros(x.numel(), dtype=torch.bool)
            keep[sorted(range(x.numel()), key=lambda j: (-abs(float(x[j])), j))[:k]] = True
            rows.append([float(v) if keep[j] else 0.0 for j, v in enumerate(x)])
        merged = []
        for j in range(len(rows[0])):
            col = [r[j] for r in rows]
            votes = sum((v > 0) - (v < 0) for v in col)
            sign = 1 if votes >= 0 else -1
            agreeing = [v for v in col if v * sign > 0]
            merged.append(statistics.median(agreeing) if agreeing else 0.0)
        out[key] = torch.tensor(merged, dtype=torch.float32).reshape(deltas[0][key].shape)
    return out


@pytest.mark.parametrize(("n", "density"), [(5, 1.0), (6, 0.4), (7, 0.2)])
def test_equals_the_plain_transcription(honest: Honest, n: int, density: float) -> None:
    ds = honest(n, seed=n, spread=1.0)
    out = merge("robust_ties", ds, density=density)
    ref = plain_robust_ties(ds, density)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)


def test_a_scaled_attacker_gains_no_leverage(honest: Honest) -> None:
    ds = honest(8, seed=9)
    clean = merge("robust_ties", ds, density=1.0)
    attacked = [*ds, {k: 1000 * v for k, v in ds[0].items()}]
    robust = merge("robust_ties", attacked, density=1.0)
    plain_ties = merge("ties", attacked, density=1.0)
    err_robust = global_norm({k: robust[k] - clean[k] for k in clean})
    err_ties = global_norm({k: plain_ties[k] - clean[k] for k in clean})
    assert err_robust < 0.2 * global_norm(clean)
    assert err_ties > 10 * err_robust


def test_count_election_resists_a_few_large_sign_flips() -> None:
    honest_vals = [1.0, 1.2, 0.9, 1.1, 1.0]
    attackers = [-8.0, -9.0]  # large magnitude wins TIES's "total" vote, not the count vote
    ds = [{"w": torch.tensor([v])} for v in honest_vals + attackers]
    out = merge("robust_ties", ds, density=1.0, equalize_norms=False)
    assert float(out["w"]) == pytest.approx(1.0)
    assert float(merge("ties", ds, density=1.0)["w"]) < 0


def test_weights_are_ignored_and_norms_recorded(honest: Honest) -> None:
    ds = honest(5, seed=2)
    agg = create("robust_ties")
    agg.begin({k: v.shape for k, v in ds[0].items()})
    for i, d in enumerate(ds):
        agg.add(d, weight=float(10**i), client_id=f"c{i}")
    out = agg.finalize()
    torch.testing.assert_close(out["w"], merge("robust_ties", ds)["w"])
    assert agg.client_norms["c3"] == pytest.approx(global_norm(ds[3]), rel=1e-9)  # type: ignore[attr-defined]
