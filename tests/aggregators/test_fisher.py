"""``fisher`` (Matena & Raffel 2022) against a per-coordinate re-implementation of the paper's formula."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import create, get, merge
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError, IncompatibleDeltasError, InvalidSubmission

SHAPES = {"w": (4, 5), "b": (5,)}


def clients(n: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    deltas = [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]
    fishers = [{k: torch.rand(s, generator=g) ** 3 for k, s in SHAPES.items()} for _ in range(n)]
    return deltas, fishers


def reference(deltas, fishers, ws, floor=1e-6, normalize=False):  # type: ignore[no-untyped-def]
    """θ* = Σ λ_i (F_i + floor) θ_i / Σ λ_i (F_i + floor), one coordinate at a time."""
    if normalize:
        norms = [sum(float((f**2).sum()) for f in fi.values()) ** 0.5 for fi in fishers]
        fishers = [{k: f / n for k, f in fi.items()} for fi, n in zip(fishers, norms, strict=True)]
    out = {}
    for k, shape in SHAPES.items():
        flat = torch.zeros(torch.Size(shape).numel())
        for j in range(flat.numel()):
            num = sum(w * (float(f[k].reshape(-1)[j]) + floor) * float(d[k].reshape(-1)[j])
                      for d, f, w in zip(deltas, fishers, ws, strict=True))  # fmt: skip
            den = sum(w * (float(f[k].reshape(-1)[j]) + floor) for f, w in zip(fishers, ws, strict=True))
            plain = sum(w * float(d[k].reshape(-1)[j]) for d, w in zip(deltas, ws, strict=True)) / sum(ws)
            flat[j] = num / den if den > 0 else plain
        out[k] = flat.reshape(shape)
    return out


def run(deltas, fishers, ws, **params):  # type: ignore[no-untyped-def]
    agg = create("fisher", **params)
    agg.begin(SHAPES)
    for i, (d, f, w) in enumerate(zip(deltas, fishers, ws, strict=True)):
        agg.add(d, w, client_id=i, fisher=f)
    return agg.finalize()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("floor", [1e-6, 0.1])
def test_matches_the_paper(normalize: bool, floor: float) -> None:
    deltas, fishers = clients(4, seed=1)
    ws = [1.0, 2.0, 0.5, 3.0]
    got = run(deltas, fishers, ws, fisher_floor=floor, normalize=normalize)
    want = reference(deltas, fishers, ws, floor=floor, normalize=normalize)
    for k in SHAPES:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_the_fisher_pulls_each_coordinate_to_its_confident_client() -> None:
    a, b = {"w": torch.ones(4, 5), "b": torch.ones(5)}, {"w": -torch.ones(4, 5), "b": -torch.ones(5)}
    fa = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}
    fb = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}
    fa["w"][0] = 1e3  # client a is confident about row 0, b about row 1
    fb["w"][1] = 1e3
    out = run([a, b], [fa, fb], [1.0, 1.0], fisher_floor=0.0)
    assert torch.allclose(out["w"][0], torch.ones(5)) and torch.allclose(out["w"][1], -torch.ones(5))
    # where both Fishers are 0 (and no floor): the plain mean
    assert torch.equal(out["w"][2], torch.zeros(5)) and torch.equal(out["b"], torch.zeros(5))


def test_without_fisher_it_is_the_weighted_mean() -> None:
    deltas, _ = clients(3, seed=2)
    ws = [1.0, 3.0, 2.0]
    out = merge("fisher", deltas, ws)
    ref = merge("fedavg", deltas, ws)
    for k in SHAPES:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-6)


def test_sparse_deltas_equal_dense() -> None:
    deltas, fishers = clients(3, seed=3)
    for d in deltas:
        d["w"][d["w"].abs() < 0.7] = 0.0
    sparse = []
    for d in deltas:
        flat = d["w"].reshape(-1)
        idx = flat.nonzero().reshape(-1)
        sparse.append({"w": SparseTensor(idx, flat[idx], (4, 5)), "b": d["b"]})
    ws = [1.0, 2.0, 1.5]
    dense_out = run(deltas, fishers, ws)
    sparse_out = run(sparse, fishers, ws)
    for k in SHAPES:
        torch.testing.assert_close(sparse_out[k], dense_out[k], rtol=1e-6, atol=1e-6)


def test_bad_fishers_are_refused_before_anything_is_folded() -> None:
    deltas, fishers = clients(2, seed=4)
    agg = create("fisher")
    agg.begin(SHAPES)
    agg.add(deltas[0], 1.0, fisher=fishers[0])
    for bad, error, match in (
        ({**fishers[1], "b": -torch.ones(5)}, InvalidSubmission, "negative"),
        ({**fishers[1], "b": torch.full((5,), float("nan"))}, InvalidSubmission, "non-finite"),
        ({"w": fishers[1]["w"]}, IncompatibleDeltasError, "'b'"),
        ({**fishers[1], "w": torch.ones(5, 4)}, IncompatibleDeltasError, "'w'"),
    ):
        with pytest.raises(error, match=match):
            agg.add(deltas[1], 1.0, fisher=bad)
    assert agg.num_clients == 1
    out = agg.finalize()
    for k in SHAPES:
        torch.testing.assert_close(out[k], deltas[0][k])
    with pytest.raises(ConfigError):
        create("fisher", fisher_floor=-1.0)
    assert get("fisher").streaming and get("fisher").averaging
