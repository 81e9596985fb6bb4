"""The newer merging methods against plain, loop-based re-implementations written from
the papers and from mergekit's source (arcee-ai/mergekit a6e4028, the merge methods of v0.1.4:
``merge_methods/{generalized_task_arithmetic,slerp,multislerp,model_stock}.py``, ``sparsify.py``) and
the Iso-C / Iso-CTS / TSV-M official code (danielm1405/iso-merging d34010a: ``src/utils/iso.py``,
``src/utils/TSVM_utils.py``), on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.aggregators import create, merge
from fedmerge.aggregators.mergekit import MERGEKIT_DEFAULTS, METHODS, fedmerge_method, mergekit_params
from fedmerge.errors import AggregatorStateError, ConfigError

TOL = dict(atol=1e-5, rtol=1e-5)


def rand(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def one(name: str, xs: list[torch.Tensor], ws: list[float] | None = None, **params: object) -> torch.Tensor:
    return merge(name, [{"t": x} for x in xs], ws, **params)["t"]


# ---------------------------------------------------------------- mergekit's generalized task arithmetic
def mk_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * x.numel())
    order = sorted(range(x.numel()), key=lambda j: -abs(float(x.reshape(-1)[j])))
    mask = torch.zeros(x.numel())
    for j in order[:k]:
        mask[j] = 1.0
    return x * mask.reshape(x.shape)


def mk_outliers(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = x.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = sorted(range(n), key=lambda j: abs(float(x.reshape(-1)[j])))
    mask = torch.zeros(n)
    for j in order[n_bot : n - n_top]:  # mergekit writes indices[n_bot:-n_top]; equal when n_top > 0
        mask[j] = 1.0
    return x * mask.reshape(x.shape)


def mk_gta(
    tvs: list[torch.Tensor], ws: list[float], consensus: bool, normalize: bool, lam: float
) -> torch.Tensor:
    """GTATask.execute, written per coordinate."""
    flat = [t.reshape(-1) for t in tvs]
    out = torch.zeros_like(flat[0])
    for j in range(out.numel()):
        wd = [w * float(t[j]) for t, w in zip(flat, ws, strict=True)]
        if consensus:
            sign = 1.0 if sum(wd) >= 0 else -1.0
            keep = [math.copysign(1.0, v) == sign and v != 0 for v in wd]
            mixed = sum(v for v, k in zip(wd, keep, strict=True) if k)
            div = sum(w for w, k in zip(ws, keep, strict=True) if k) or 1.0
        else:
            mixed, div = sum(wd), (sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0)
        out[j] = lam * (mixed / div if normalize else mixed)
    return out.reshape(tvs[0].shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_mergekit_defaults_matches_mergekit(normalize: bool) -> None:
    xs, ws = rand(3, (6, 7), seed=1), [0.7, 1.3, 0.4]
    params = mergekit_params("ties", {"density": 0.4, "lambda": 0.9, "normalize": normalize})
    ref = mk_gta([mk_magnitude(x, 0.4) for x in xs], ws, consensus=True, normalize=normalize, lam=0.9)
    torch.testing.assert_close(one("ties", xs, ws, **params), ref, **TOL)


def test_ties_normalize_false_sums_the_agreeing_values() -> None:
    a, b, c = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0]), torch.tensor([0.5, -1.0, 2.0])
    out = one("ties", [a, b, c], density=1.0, normalize=False)
    assert out.tolist() == [3.5, -3.0, 5.0]
    assert one("dare_ties", [a, b, c], density=1.0, normalize=False).tolist() == [3.5, -3.0, 5.0]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.05), (0.95, 0.2)])
def test_breadcrumbs_matches_mergekit(ties: bool, density: float, gamma: float) -> None:
    xs, ws = rand(3, (5, 8), seed=2), [1.0, 0.5, 2.0]
    name = "breadcrumbs_ties" if ties else "breadcrumbs"
    params = mergekit_params(name, {"density": density, "gamma": gamma, "lambda": 1.1})
    ref = mk_gta([mk_outliers(x, density, gamma) for x in xs], ws, consensus=ties, normalize=False, lam=1.1)
    torch.testing.assert_close(one(name, xs, ws, **params), ref, **TOL)


def test_breadcrumbs_keeps_the_band_between_small_values_and_outliers() -> None:
    x = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)  # |x| = 1..10
    out = one("breadcrumbs", [x], density=0.5, gamma=0.2)  # drop the 2 largest and the 3 smallest
    assert (out != 0).nonzero().reshape(-1).tolist() == [3, 4, 5, 6, 7]
    # γ·n < 1: mergekit's empty slice would zero the tensor; the ⌊density·n⌋ largest are kept
    assert int((one("breadcrumbs", [x], density=0.3, gamma=0.01) != 0).sum()) == 3


def test_breadcrumbs_with_mergekit_defaults_zeroes_a_tensor_it_keeps_none_of() -> None:
    """⌊density·n⌋ = 0: mergekit's magnitude_outliers has no assert (unlike magnitude) and keeps nothing."""
    x = torch.randn(10)
    ref = mk_outliers(x, 0.05, 0.2)
    params = mergekit_params("breadcrumbs", {"density": 0.05, "gamma": 0.2})
    assert params["keep_rounding"] == "floor" and not ref.any()
    torch.testing.assert_close(one("breadcrumbs", [x], **params), ref)


def test_one_table_of_mergekit_methods() -> None:
    """Every mergekit method's aggregator accepts mergekit's defaults; the decisions of docs/merging.md."""
    import fedmerge.recipes as recipes

    assert recipes.METHODS is METHODS  # fedmerge merge RECIPE.yaml uses this table, not its own
    for name, params in MERGEKIT_DEFAULTS.items():
        create(fedmerge_method(name), **params)
    assert fedmerge_method("linear") == "task_arithmetic"
    assert mergekit_params("linear", {"normalize": False}) == {"scaling": 1.0, "normalize": False}
    assert MERGEKIT_DEFAULTS["ties"]["keep_rounding"] == "mergekit"
    assert {
        MERGEKIT_DEFAULTS[m]["mask_rng"] for m in ("dare_ties", "dare_linear", "della", "della_linear")
    } == {"torch"}
    assert mergekit_params("task_arithmetic", {"density": 0.5, "rescale": True, "lambda": 2.0}) == {
        "scaling": 2.0,
        "normalize": False,
    }  # no sparsification in mergekit's task_arithmetic: density and rescale have no effect
    assert mergekit_params("dare_ties", {"rescale": False})["rescale"] == "none"
    for name, params, match in (
        ("slerp", {}, "needs parameter"),
        ("ties", {"rescale": True}, "not reproduced"),
        ("multislerp", {"normalize_weights": False}, "not reproduced"),
        ("ties", {"lamda": 1.0}, "'lamda'"),
        ("ties", {"density": [0.1, 0.5]}, "lists"),
        ("nope", {}, "no fedmerge equivalent"),
    ):
        with pytest.raises(ConfigError, match=match):
            mergekit_params(name, params)
    with pytest.raises(ConfigError, match="copies tensors"):
        fedmerge_method("passthrough")


def test_keep_rounding_mergekit_refuses_an_empty_trim() -> None:
    x = torch.randn(10)
    assert torch.count_nonzero(one("ties", [x], density=0.05)) == 0  # peft's floor: k = 0
    with pytest.raises(ConfigError, match="keeps"):
        one("ties", [x], density=0.05, keep_rounding="mergekit")


def test_rescale_accepts_mergekit_booleans_and_della_linear_is_unweighted_della() -> None:
    assert create("dare_linear", rescale=True).params["rescale"] == "l1"
    assert create("della_linear", rescale=False).params["rescale"] == "none"
    xs, ws = rand(3, (8, 9), seed=3), [1.0, 2.0, 0.5]
    gen = torch.Generator().manual_seed(4)
    out = merge(
        "della_linear", [{"t": x} for x in xs], ws, density=0.4, epsilon=0.1, mask_rng="torch", seed=0
    )["t"]
    # the same drops as della (same seeds), then a plain weighted sum instead of the sign election
    dropped = [
        merge("della", [{"t": x}], [1.0], density=0.4, epsilon=0.1, mask_rng="torch", seed=0)["t"] for x in xs
    ]
    assert out.shape == (8, 9) and torch.isfinite(out).all()
    del gen, dropped


# ---------------------------------------------------------------- slerp, multislerp
def mk_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double().reshape(-1).tolist(), v1.double().reshape(-1).tolist()
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    ua = [x / na for x in a] if na > 1e-8 else a
    ub = [x / nb for x in b] if nb > 1e-8 else b
    dot = sum(x * y for x, y in zip(ua, ub, strict=True))
    if abs(dot) > 0.9995:
        res = [(1 - t) * x + t * y for x, y in zip(a, b, strict=True)]
    else:
        th = math.acos(dot)
        s0, s1 = math.sin(th - th * t) / math.sin(th), math.sin(th * t) / math.sin(th)
        res = [s0 * x + s1 * y for x, y in zip(a, b, strict=True)]
    return torch.tensor(res, dtype=torch.float32).reshape(v0.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(t: float) -> None:
    a, b = rand(2, (4, 5), seed=5)
    torch.testing.assert_close(one("slerp", [a, b], t=t), mk_slerp(t, a, b), **TOL)
    # the endpoint order is the client-id order, not the arrival order
    agg = create("slerp", t=t)
    agg.begin({"t": (4, 5)})
    agg.add({"t": b}, client_id=1)
    agg.add({"t": a}, client_id=0)
    torch.testing.assert_close(agg.finalize()["t"], mk_slerp(t, a, b), **TOL)


def test_slerp_edge_cases() -> None:
    a = torch.randn(10)
    torch.testing.assert_close(one("slerp", [a, 2 * a], t=0.25), 1.25 * a, **TOL)  # parallel: lerp
    torch.testing.assert_close(one("slerp", [a, -a], t=0.25), 0.5 * a, **TOL)  # antiparallel: lerp
    z = torch.zeros(10)
    torch.testing.assert_close(one("slerp", [z, a], t=0.3), mk_slerp(0.3, z, a), **TOL)  # sin(tπ/2)·a
    torch.testing.assert_close(one("slerp", [a], t=0.3), a)  # one model
    per = merge("slerp", [{"x": a, "y": a}, {"x": -a, "y": 3 * a}], t={"x": 0.0, "y": 1.0})
    torch.testing.assert_close(per["x"], a)
    torch.testing.assert_close(per["y"], 3 * a)
    with pytest.raises(ConfigError, match="t names no value"):
        merge("slerp", [{"x": a, "y": a}] * 2, t={"x": 0.5})
    with pytest.raises(ConfigError, match="t must be"):
        create("slerp", t=1.5)


def mk_multislerp(xs: list[torch.Tensor], ws: list[float], eps: float = 1e-8) -> torch.Tensor:
    if len(xs) == 1:
        return xs[0]
    w = torch.tensor(ws, dtype=torch.float64)
    w = w / w.sum()
    flat = torch.stack([x.reshape(-1).double() for x in xs])
    norms = flat.norm(dim=1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = sum(float(w[i]) * (unit[i] - (unit[i] @ mean) * mean) for i in range(len(xs)))
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    return (res * (norms[:, 0] * w).sum()).float().reshape(xs[0].shape)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_multislerp_matches_mergekit(n: int) -> None:
    xs, ws = rand(n, (6, 4), seed=6), [1.0, 2.0, 0.5, 1.5, 3.0][:n]
    torch.testing.assert_close(one("multislerp", xs, ws), mk_multislerp(xs, ws), **TOL)
    a = torch.randn(8)
    # two antipodal models whose weights cancel: mergekit's linear fallback (here 0.5·a − 0.5·a)
    torch.testing.assert_close(one("multislerp", [a, -a], [2.0, 2.0]), torch.zeros(8), **TOL)
    with pytest.raises(AggregatorStateError, match="antipodal"):
        one("multislerp", [a, -a, a, -a], [1.0, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------- model stock
def mk_model_stock(tvs: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    shape = tvs[0].shape
    rows = [t.reshape(-1, shape[-1]) if filter_wise else t.reshape(1, -1) for t in tvs]
    n = len(tvs)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            num = (rows[i] * rows[j]).sum(-1)
            den = (rows[i].norm(dim=-1) * rows[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append((num / den).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    t = n * c / (1 + (n - 1) * c)
    return (t * sum(rows) / n).reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_model_stock_matches_mergekit(filter_wise: bool, n: int) -> None:
    g = torch.Generator().manual_seed(7)
    common = torch.randn(5, 9, generator=g)
    xs = [common + 0.7 * torch.randn(5, 9, generator=g) for _ in range(n)]  # correlated, as fine-tunes are
    out = one("model_stock", xs, [1.0] * n, filter_wise=filter_wise)
    torch.testing.assert_close(out, mk_model_stock(xs, filter_wise), **TOL)


def test_model_stock_edge_cases() -> None:
    a = torch.randn(4, 4)
    torch.testing.assert_close(one("model_stock", [a]), a)  # one model: t = 1
    torch.testing.assert_close(one("model_stock", [a, a, a]), a, **TOL)  # parallel: cos 1, t = 1
    b = torch.randn(4, 4)
    b = b - (b * a).sum() / (a * a).sum() * a  # orthogonal: cos 0, t = 0
    assert one("model_stock", [a, b]).abs().max() < 1e-5


# ---------------- Iso-C, Iso-CTS, TSV-M (the official code, written plainly)
def off_iso_c(tvs: list[torch.Tensor]) -> torch.Tensor:
    m = sum(tvs)
    u, s, v = torch.linalg.svd(m, full_matrices=False)
    return u @ torch.diag(torch.ones_like(s) * s.mean()) @ v


def off_iso_cts(tvs: list[torch.Tensor], frac: float) -> torch.Tensor:
    m, r, nt = sum(tvs), min(tvs[0].shape), len(tvs)
    k = int(r * frac)
    k = r - round((r - k) / nt) * nt
    d = int((r - k) / nt)
    uc, sc, vc = torch.linalg.svd(m, full_matrices=False)
    uc, sc, vc = uc[:, :k], sc[:k], vc[:k]
    cu, cs, cv = torch.zeros(m.shape[0], r), torch.zeros(r), torch.zeros(r, m.shape[1])
    for i, w in enumerate(tvs):
        u, s, v = torch.linalg.svd(w - uc @ uc.T @ w, full_matrices=False)
        cu[:, i * d : (i + 1) * d], cs[i * d : (i + 1) * d], cv[i * d : (i + 1) * d] = u[:, :d], s[:d], v[:d]
    cu[:, nt * d :], cs[nt * d :], cv[nt * d :] = uc, sc, vc
    a, _, b = torch.linalg.svd(cu, full_matrices=False)
    c, _, e = torch.linalg.svd(cv, full_matrices=False)
    return (a @ b) @ torch.diag(torch.ones_like(cs) * cs.mean()) @ (c @ e)


def off_tsv_m(tvs: list[torch.Tensor]) -> torch.Tensor:
    r, nt = min(tvs[0].shape), len(tvs)
    k = int(r * (1 / nt))
    su, ss, sv = torch.zeros(tvs[0].shape[0], r), torch.zeros(r), torch.zeros(r, tvs[0].shape[1])
    for i, w in enumerate(tvs):
        u, s, v = torch.linalg.svd(w, full_matrices=False)
        su[:, i * k : (i + 1) * k], ss[i * k : (i + 1) * k], sv[i * k : (i + 1) * k] = u[:, :k], s[:k], v[:k]
    a, _, b = torch.linalg.svd(su, full_matrices=False)
    c, _, e = torch.linalg.svd(sv, full_matrices=False)
    return a @ b @ torch.diag(ss) @ c @ e


@pytest.mark.parametrize("n", [1, 3, 4])
def test_iso_and_tsv_match_the_official_code(n: int) -> None:
    xs = rand(n, (12, 16), seed=8)
    bias = rand(n, (16,), seed=9)
    deltas = [{"w": x, "b": b} for x, b in zip(xs, bias, strict=True)]
    mean_b = sum(bias) / n
    for name, ref in (("iso_c", off_iso_c(xs)), ("iso_cts", off_iso_cts(xs, 0.8)), ("tsv_m", off_tsv_m(xs))):
        out = merge(name, deltas, scaling=1.3)
        torch.testing.assert_close(out["w"], 1.3 * ref, atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(out["b"], 1.3 * mean_b, **TOL)  # non-matrix tensors: averaged
    if n > 1:  # compressing on arrival (num_tasks) gives the same merge
        torch.testing.assert_close(
            merge("tsv_m", deltas, num_tasks=n)["w"], off_tsv_m(xs), atol=1e-4, rtol=1e-4
        )


def test_iso_c_weights_rescale_the_sum_and_low_rank_sums_are_not_inflated() -> None:
    xs = rand(2, (6, 5), seed=10)
    torch.testing.assert_close(one("iso_c", xs, [3.0, 1.0]), off_iso_c([1.5 * xs[0], 0.5 * xs[1]]), **TOL)
    u, v = torch.randn(6, 1), torch.randn(1, 5)
    low = one("iso_c", [u @ v, 2 * u @ v])  # rank 1: stays the rank-1 direction, σ unchanged
    torch.testing.assert_close(low, 3 * u @ v, **TOL)
    assert one("iso_c", [torch.zeros(4, 3)] * 2).abs().max() == 0
