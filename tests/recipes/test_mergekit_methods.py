"""mergekit 0.1.5's methods that fedmerge added (nuslerp, nearswap, arcee_fusion, sce, ram,
ramplus_tl): each aggregator against a plain, element-by-element reference of mergekit's formula."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.aggregators import create


def run(
    name: str, xs: list[torch.Tensor], weights: list[float] | None = None, **params: object
) -> torch.Tensor:
    agg = create(name, **params)
    agg.begin({"w": xs[0].shape})
    for i, x in enumerate(xs):
        agg.add({"w": x}, 1.0 if weights is None else weights[i], client_id=i)
    return agg.finalize()["w"]


def tensors(n: int, shape: tuple[int, ...] = (6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def ref_slerp_vec(t: float, a: list[float], b: list[float]) -> list[float]:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    cos = sum(x / max(na, 1e-7) * y / max(nb, 1e-7) for x, y in zip(a, b, strict=True))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b, strict=True)]
    th = math.acos(cos)
    return [
        (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th) for x, y in zip(a, b, strict=True)
    ]


@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp_against_a_plain_reference(mode: str) -> None:
    a, b = tensors(2)
    w = [1.0, 3.0]  # t = 3 / 4
    params = {
        "flatten": {},
        "rows": {"nuslerp_flatten": False},
        "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    }[mode]
    out = run("nuslerp", [a, b], w, **params)
    t = 0.75
    if mode == "flatten":
        ref = torch.tensor(ref_slerp_vec(t, a.flatten().tolist(), b.flatten().tolist())).reshape(a.shape)
    elif mode == "rows":
        ref = torch.tensor([ref_slerp_vec(t, a[i].tolist(), b[i].tolist()) for i in range(a.shape[0])])
    else:
        cols = [ref_slerp_vec(t, a[:, j].tolist(), b[:, j].tolist()) for j in range(a.shape[1])]
        ref = torch.tensor(cols).T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # weights summing to ~0 interpolate half way; colinear inputs are linearly interpolated
    torch.testing.assert_close(run("nuslerp", [a, 2 * a], [1.0, 1.0]), 1.5 * a)


def test_nearswap_against_a_plain_reference() -> None:
    a, b = tensors(2)
    b = a + 0.01 * b
    t = 0.004
    out = run("nearswap", [a, b], t=t)
    ref = torch.empty_like(a)
    for idx in range(a.numel()):
        x0, x1 = float(a.view(-1)[idx]), float(b.view(-1)[idx])
        w = min(1.0, max(0.0, t / max(abs(x0 - x1), 1e-6)))
        ref.view(-1)[idx] = w * x1 + (1 - w) * x0
    torch.testing.assert_close(out, ref)
    assert 0 < int(((out - b).abs() < 1e-7).sum()) < a.numel()  # some entries taken, some shrunk


def test_arcee_fusion_against_a_plain_reference() -> None:
    a, b = tensors(2, (16, 12))
    b = a + 0.3 * b * (torch.rand(a.shape, generator=torch.Generator().manual_seed(5)) > 0.7)
    out = run("arcee_fusion", [a, b])
    rows = []
    for i in range(a.shape[0]):
        pa = [math.exp(x) for x in a[i].tolist()]
        pb = [math.exp(x) for x in b[i].tolist()]
        sa, sb = sum(pa), sum(pb)
        kl = sum(
            (p / sb + 1e-8) * math.log((p / sb + 1e-8) / (q / sa + 1e-8)) for p, q in zip(pb, pa, strict=True)
        )
        rows.append([abs(y - x) * kl for x, y in zip(a[i].tolist(), b[i].tolist(), strict=True)])
    flat = sorted(v for r in rows for v in r)
    q = [flat[int(f * (len(flat) - 1))] for f in (0.25, 0.5, 0.75)]
    thr = q[1] + 1.5 * (q[2] - q[0])
    ref = a.clone()
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if rows[i][j] >= thr:
                ref[i, j] = b[i, j]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert 0 < int((out != a).sum()) < int((b != a).sum())  # a strict subset of the changes is kept


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_against_a_plain_reference(topk: float) -> None:
    xs = tensors(3, (5, 4), seed=2)
    out = run("sce", xs, select_topk=topk)
    n, numel = len(xs), xs[0].numel()
    cols = [[float(x.view(-1)[j]) for x in xs] for j in range(numel)]
    if topk < 1:
        var = [sum((v - sum(c) / n) ** 2 for v in c) / n for c in cols]
        k = int(sum(1 for v in var if v != 0) * topk)
        keep = set(sorted(range(numel), key=lambda j: -abs(var[j]))[:k])
        cols = [c if j in keep else [0.0] * n for j, c in enumerate(cols)]
    ms = [sum(cols[j][i] ** 2 for j in range(numel)) / numel for i in range(n)]
    eta = [m / sum(ms) for m in ms]
    ref = []
    for c in cols:
        sign = 1.0 if sum(c) >= 0 else -1.0
        agree = [(v > 0 and sign > 0) or (v < 0 and sign < 0) for v in c]
        num = sum(eta[i] * c[i] for i in range(n) if agree[i])
        den = sum(eta[i] for i in range(n) if agree[i])
        ref.append(num / max(den, 1e-6))
    torch.testing.assert_close(out, torch.tensor(ref).reshape(xs[0].shape), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("plus", [False, True])
def test_ram_against_a_plain_reference(plus: bool) -> None:
    xs = tensors(3, (6, 6), seed=3)
    g = torch.Generator().manual_seed(4)
    xs = [x * (torch.rand(x.shape, generator=g) > 0.5) for x in xs]  # sparse task vectors that overlap
    eps, r, alpha = 1e-5, 0.1, 0.2
    out = run("ramplus_tl" if plus else "ram", xs)
    n, numel = len(xs), xs[0].numel()
    contrib = [[abs(float(x.view(-1)[j])) > eps for j in range(numel)] for x in xs]
    counts = [sum(contrib[i][j] for i in range(n)) for j in range(numel)]
    lam = [1.0] * n
    if plus:
        for i in range(n):
            shared = sum(1 for j in range(numel) if contrib[i][j] and counts[j] > 1)
            unique = sum(1 for j in range(numel) if contrib[i][j] and counts[j] == 1)
            lam[i] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    ref = []
    for j in range(numel):
        v = 0.0
        for i in range(n):
            if contrib[i][j]:
                x = float(xs[i].view(-1)[j])
                v += x * lam[i] if counts[j] == 1 else x / counts[j]
        ref.append(v)
    torch.testing.assert_close(out, torch.tensor(ref).reshape(xs[0].shape), atol=1e-6, rtol=1e-6)
