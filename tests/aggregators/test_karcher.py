"""``karcher`` against a line-by-line port of mergekit's ``karcher_merge_tensors`` (arcee-ai/mergekit a6e4028,
``merge_methods/karcher.py``), the sphere's geometry, and ``merge_method: karcher`` in recipes."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.aggregators import create, get, merge
from fedmerge.aggregators.karcher import karcher_mean
from fedmerge.aggregators.mergekit import MERGEKIT_DEFAULTS, fedmerge_method, mergekit_params
from fedmerge.errors import ConfigError


def mk_karcher(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5):  # type: ignore[no-untyped-def]
    """mergekit's karcher_merge_tensors, per model in a Python loop, as written there."""
    if len(tensors) == 1:
        return tensors[0]
    norms, units = [], []
    for t in tensors:
        n = torch.linalg.norm(t.float())
        if n.item() == 0.0:
            norms.append(0.0)
            units.append(torch.zeros_like(t))
        else:
            norms.append(n.item())
            units.append(t / n)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    u = torch.zeros_like(vu[0])
    for a, ui in zip(na, vu, strict=True):
        u += a * ui
    norm_u = torch.linalg.norm(u.float()).item()
    u = vu[0].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        big_t = torch.zeros_like(u)
        for a, ui in zip(na, vu, strict=True):
            dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            big_t += a * (theta / torch.sin(theta)) * (ui - dot * u)
        norm_t = torch.linalg.norm(big_t.float())
        if norm_t.item() < tol:
            break
        u = torch.cos(norm_t) * u + torch.sin(norm_t) * (big_t / norm_t)
        u_norm = torch.linalg.norm(u.float())
        if u_norm.item() > tol:
            u = u / u_norm
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * u


def rand(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (1, 1e-5), (50, 1e-7)])
def test_equal_weights_match_mergekit(n: int, max_iter: int, tol: float) -> None:
    xs = rand(n, (6, 9), seed=n)
    ref = mk_karcher(xs, [1.0 / n] * n, max_iter=max_iter, tol=tol)
    out = merge("karcher", [{"w": x} for x in xs], None, max_iter=max_iter, tol=tol)["w"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_weights_give_a_weighted_mean_and_zero_inputs_count_in_the_scale() -> None:
    xs = [*rand(3, (40,), seed=7), torch.zeros(40)]
    ws = [0.5, 2.0, 1.0, 1.5]
    ref = mk_karcher(xs, [w / sum(ws) for w in ws])
    out = merge("karcher", [{"w": x} for x in xs], ws)["w"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, merge("karcher", [{"w": x} for x in xs], None)["w"])


def test_two_directions_meet_at_the_geodesic_midpoint() -> None:
    """Equal weights, two unit vectors at angle φ: the Karcher mean is the slerp midpoint, at φ/2 of each."""
    e0, e1 = torch.zeros(5), torch.zeros(5)
    e0[0], e1[0], e1[1] = 1.0, math.cos(2.0), math.sin(2.0)  # φ = 2 rad: far from the chordal mean's regime
    out = karcher_mean([e0, e1], [1.0, 1.0], max_iter=50, tol=1e-7)
    torch.testing.assert_close(out, torch.tensor([math.cos(1.0), math.sin(1.0), 0, 0, 0]), atol=1e-5, rtol=0)


def test_three_points_stationarity() -> None:
    """At the mean, the weighted log-maps sum to zero (the Karcher mean's defining condition)."""
    xs = rand(3, (8,), seed=11)
    ws = [1.0, 3.0, 2.0]
    u = karcher_mean(xs, ws, max_iter=200, tol=1e-9)
    u = u / u.norm()
    grad = torch.zeros(8)
    for x, w in zip(xs, ws, strict=True):
        ui = x / x.norm()
        dot = torch.clamp(u @ ui, -1, 1)
        theta = torch.arccos(dot)
        grad += w * theta / torch.sin(theta) * (ui - dot * u)
    assert float(grad.norm()) < 1e-4
    # and it is not the chordal (normalised arithmetic) mean
    chordal = sum(w * x / x.norm() for x, w in zip(xs, ws, strict=True))
    assert not torch.allclose(u, chordal / chordal.norm(), atol=1e-4)


def test_declares_buffering_and_checks_parameters() -> None:
    assert get("karcher").streaming is False and get("karcher").averaging
    for bad in ({"max_iter": 0}, {"max_iter": 2.5}, {"tol": -1.0}):
        with pytest.raises(ConfigError):
            create("karcher", **bad)  # type: ignore[arg-type]


def test_recipes_accept_karcher() -> None:
    assert fedmerge_method("karcher") == "karcher"
    assert MERGEKIT_DEFAULTS["karcher"] == {"max_iter": 10, "tol": 1e-5}
    agg = create("karcher", **mergekit_params("karcher", {"max_iter": 20, "tol": 1e-6}))
    assert agg.params["max_iter"] == 20 and agg.params["tol"] == 1e-6
