"""Each method against an independent plain implementation (peft's merge_utils where it has one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils
from scipy import stats

from fedmerge.aggregators import create
from fedmerge.aggregators.kernels import (
    _splitmix_uniform_torch,
    keep_mask,
    seeded_uniform,
    topk_threshold,
    trim_topk,
)

TOL = dict(atol=1e-6, rtol=1e-6)


def stacked(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def run_one(name: str, xs: list[torch.Tensor], ws: list[float], generator=None, **params):  # type: ignore[no-untyped-def]
    agg = create(name, **params)
    agg.begin({"t": xs[0].shape})
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        agg.add({"t": x}, w, client_id=i, generator=generator)
    return agg.finalize()["t"]


@pytest.mark.parametrize("shape", [(64, 48), (300_000,)])  # the second takes the sampled-threshold path
@pytest.mark.parametrize("density", [0.1, 0.2, 0.7])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_peft(shape: tuple[int, ...], density: float, method: str) -> None:
    xs = stacked(5, shape, seed=11)
    ws = [0.5, 1.0, 2.0, 0.25, 1.5]
    ref = merge_utils.ties(xs, torch.tensor(ws), density, majority_sign_method=method)
    out = run_one("ties", xs, ws, density=density, sign_election=method)
    torch.testing.assert_close(out, ref, **TOL)


def test_ties_mergekit_variant_matches_plain_reference() -> None:
    """vote_weighting='weighted', divisor='weight': elect on Σ w τ̂, divide by Σ of agreeing weights."""
    xs = stacked(4, (40, 30), seed=12)
    ws = torch.tensor([3.0, 1.0, 0.5, 2.0])
    trimmed = torch.stack([merge_utils.magnitude_based_pruning(x, 0.3) for x in xs])
    weighted = trimmed * ws[:, None, None]
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = weighted.sign() == majority
    divisor = (ws[:, None, None] * mask).sum(0)
    divisor[divisor == 0] = 1
    ref = 0.7 * (weighted * mask).sum(0) / divisor
    params = dict(density=0.3, scaling=0.7, vote_weighting="weighted", divisor="weight")
    out = run_one("ties", xs, ws.tolist(), **params)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_matches_peft_with_the_same_masks(name: str, density: float) -> None:
    xs = stacked(4, (50, 40), seed=13)
    ws = [1.0, 0.5, 2.0, 1.5]
    torch.manual_seed(1234)  # peft draws its Bernoulli masks from the global RNG, client after client
    ref = getattr(merge_utils, name)(xs, torch.tensor(ws), density)
    gen = torch.Generator().manual_seed(1234)
    out = run_one(name, xs, ws, generator=gen, density=density, mask_rng="torch")
    torch.testing.assert_close(out, ref, **TOL)


def splitmix64_reference(seed: int, n: int) -> list[float]:
    """SplitMix64 (Steele, Lea & Flood 2014) written out in plain Python integers."""
    mask, state, out = (1 << 64) - 1, seed, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append((z ^ (z >> 31)) >> 11)
    return [v / 2**53 for v in out]


@pytest.mark.parametrize("seed", [0, 7, 2**62 + 5])
def test_seeded_uniform_is_splitmix64_on_every_path(seed: int) -> None:
    ref = torch.tensor(splitmix64_reference(seed, 257), dtype=torch.float64)
    assert torch.equal(seeded_uniform(257, seed), ref)
    assert torch.equal(_splitmix_uniform_torch(seed, 257, torch.device("cpu")), ref)  # the GPU path


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della"])
def test_splitmix_masks_match_the_plain_definition(name: str) -> None:
    """With mask_rng=splitmix64 the mask of client i is u < p for u regenerated from its seed."""
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    gen_seed = 77
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(gen_seed)))
    u = torch.tensor(splitmix64_reference(seed, x.numel()), dtype=torch.float64).reshape(x.shape)
    params: dict = {"density": 0.4}
    if name == "della":
        params["epsilon"] = 0.1
        ranks = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).float()
        probs = 0.3 + ranks / ranks.max(1, keepdim=True).values * 0.2
    else:
        probs = torch.full(x.shape, 0.4)
    expected = torch.where(u < probs, x / probs, torch.zeros(()))
    out = run_one(name, [x], [1.0], generator=torch.Generator().manual_seed(gen_seed), **params)
    torch.testing.assert_close(out, expected, **TOL)


def test_dare_keeps_the_expected_fraction_and_is_unbiased() -> None:
    x = torch.ones(200_000)
    out = run_one("dare_linear", [x], [1.0], density=0.25, seed=5)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.005
    assert abs(out.mean().item() - 1.0) < 0.02  # E[m/density] = 1
    l1 = run_one("dare_linear", [x], [1.0], density=0.25, rescale="l1", seed=5)
    assert abs(l1.abs().sum().item() - x.abs().sum().item()) < 1.0  # mergekit's norm-matching rescale


def test_della_matches_plain_reference() -> None:
    xs = stacked(3, (20, 33), seed=14)
    ws = [1.0, 2.0, 0.5]
    density, eps = 0.4, 0.15
    gen = torch.Generator().manual_seed(99)
    dropped = []
    for x in xs:  # mergekit's della_magprune, written out
        ranks = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).float() + 1
        lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
        probs = (density - eps) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * eps
        dropped.append(x * torch.bernoulli(probs, generator=gen) / probs)
    t = torch.stack(dropped)
    majority = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    mask = t.sign() == majority
    ref = (t * torch.tensor(ws)[:, None, None] * mask).sum(0) / mask.sum(0).clamp(min=1)
    gen = torch.Generator().manual_seed(99)
    out = run_one("della", xs, ws, generator=gen, density=density, epsilon=eps, mask_rng="torch")
    torch.testing.assert_close(out, ref, **TOL)


def test_fedavg_and_task_arithmetic_match_plain_sums() -> None:
    xs = stacked(6, (17, 9), seed=15)
    ws = [10.0, 20.0, 5.0, 1.0, 7.0, 3.0]
    t, w = torch.stack(xs), torch.tensor(ws)[:, None, None]
    torch.testing.assert_close(run_one("fedavg", xs, ws), (t * w).sum(0) / w.sum(), **TOL)
    ref = 0.3 * merge_utils.task_arithmetic(xs, torch.tensor(ws))
    torch.testing.assert_close(run_one("task_arithmetic", xs, ws, scaling=0.3), ref, **TOL)


def test_magmax_picks_the_largest_magnitude_entry() -> None:
    xs = stacked(5, (30, 7), seed=16)
    t = torch.stack(xs)
    ref = t.gather(0, t.abs().argmax(0, keepdim=True))[0]
    torch.testing.assert_close(run_one("magmax", xs, [1.0] * 5), ref, **TOL)
    # exact magnitude tie: the positive value wins whatever the order
    a, b = torch.tensor([2.0, -3.0]), torch.tensor([-2.0, 3.0])
    assert run_one("magmax", [a, b], [1, 1]).tolist() == [2.0, 3.0]
    assert run_one("magmax", [b, a], [1, 1]).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("n", [1, 4, 5])
def test_median_and_trimmed_mean_match_numpy_and_scipy(n: int) -> None:
    xs = stacked(n, (13, 11), seed=17)
    arr = torch.stack(xs).numpy()
    torch.testing.assert_close(run_one("median", xs, [1.0] * n), torch.from_numpy(np.median(arr, 0)), **TOL)
    beta = 0.2
    ref = torch.from_numpy(stats.trim_mean(arr, beta, axis=0).astype(np.float32))
    torch.testing.assert_close(run_one("trimmed_mean", xs, [1.0] * n, beta=beta), ref, **TOL)


def test_robust_methods_resist_one_outlier() -> None:
    xs = [torch.full((10,), 1.0) for _ in range(6)] + [torch.full((10,), 1e6)]
    assert torch.allclose(run_one("median", xs, [1.0] * 7), torch.ones(10))
    assert torch.allclose(run_one("trimmed_mean", xs, [1.0] * 7, beta=0.15), torch.ones(10))


@pytest.mark.parametrize("n", [1000, 70_000, 1_000_003])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_topk_threshold_is_exact(n: int, density: float) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    k = int(density * n)
    thr, cut = topk_threshold(x, k)
    assert int(keep_mask(x, thr, cut).sum()) == k
    if 0 < k < n:
        assert thr == torch.topk(x.abs(), k).values.min().item()


@pytest.mark.parametrize("n", [1000, 300_000])
def test_topk_threshold_with_many_ties_selects_exactly_k_in_flat_order(n: int) -> None:
    x = torch.randint(-3, 4, (n,), generator=torch.Generator().manual_seed(1)).float()
    for k in (1, n // 7, n // 2, n - 1):
        thr, cut = topk_threshold(x, k)
        keep = keep_mask(x, thr, cut)
        assert int(keep.sum()) == k
        assert bool(x.abs()[keep].min() >= x.abs()[~keep].max())  # a true top-k by magnitude
        tied = torch.nonzero(x.abs() == thr).reshape(-1)
        kept_tied = torch.nonzero((x.abs() == thr) & keep).reshape(-1)
        assert torch.equal(kept_tied, tied[: len(kept_tied)])  # the earliest tied entries are the ones kept


def test_trim_topk_breaks_magnitude_ties_by_position() -> None:
    x = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0, -2.0])
    out = trim_topk(x, 3)  # -2 plus the first two of the four tied ±1 entries
    assert out.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, -2.0]
    ties = run_one("ties", [x, x], [1.0, 1.0], density=0.5)  # the fused trim makes the same choice
    assert ties.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, -2.0]
    big = torch.zeros(100_000)
    big[::2] = 1.0  # 50 000 ties at the threshold
    assert int((trim_topk(big, 10_000) != 0).sum()) == 10_000
