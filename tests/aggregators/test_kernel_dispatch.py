"""The serial and parallel compilations of every fold give the same result (kernels.SizedKernel)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedmerge.aggregators import kernels as K

pytestmark = pytest.mark.skipif(not K.HAVE_NUMBA, reason="numba is not installed")

N = 50_000


def _inputs(seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, generator=g) for _ in range(3)]
    xs[1][::7] = xs[0][::7]  # magnitude ties between clients
    idx = torch.randperm(N, generator=g)[: N // 10].sort().values
    return xs, idx, xs[2][idx]


def _weighted_sum(xs: list[torch.Tensor], idx: torch.Tensor, vals: torch.Tensor) -> list[torch.Tensor]:
    acc = K.zeros(N, torch.device("cpu"))
    K.weighted_sum_dense(xs[:2], [0.25, 0.75], acc)
    K.weighted_sum_sparse(idx, vals, 0.5, acc)
    return [acc]


def _sign_split(xs: list[torch.Tensor], idx: torch.Tensor, vals: torch.Tensor) -> list[torch.Tensor]:
    acc = [K.zeros(N, torch.device("cpu")) for _ in range(5)]
    thr = [K.topk_threshold(x, N // 5) for x in xs[:2]]
    thresholds, cuts = [t for t, _ in thr], [c for _, c in thr]
    K.sign_split_dense(xs[:2], thresholds, cuts, [1.0, 1.0], [0.5, 0.5], [1.0, 1.0], K.VOTE_TOTAL, acc)
    K.sign_split_sparse(idx, vals, 0.1, 1.0, 0.5, 1.0, K.VOTE_FREQUENCY, acc)
    return [*acc, K.disjoint_mean(acc, 0.7)]


def _max_abs(xs: list[torch.Tensor], idx: torch.Tensor, vals: torch.Tensor) -> list[torch.Tensor]:
    acc = K.zeros(N, torch.device("cpu"))
    K.max_abs_dense(xs[:2], acc)
    K.max_abs_sparse(idx, -vals, acc)
    return [acc]


def _seeded(xs: list[torch.Tensor], idx: torch.Tensor, vals: torch.Tensor) -> list[torch.Tensor]:
    return [K.seeded_uniform(N, 12345), K.seeded_bernoulli_scale(xs[0], 0.3, 1 / 0.3, 99)]


FOLDS: dict[str, Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]]] = {
    "weighted_sum": _weighted_sum,
    "sign_split": _sign_split,
    "max_abs": _max_abs,
    "seeded": _seeded,
}


@pytest.mark.parametrize("fold", sorted(FOLDS))
def test_serial_and_parallel_kernels_agree(fold: str, monkeypatch: pytest.MonkeyPatch) -> None:
    xs, idx, vals = _inputs(7)
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    serial = FOLDS[fold](xs, idx, vals)
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 0)
    parallel = FOLDS[fold](xs, idx, vals)
    assert any(bool(t.abs().sum() > 0) for t in serial)
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_small_problems_take_the_serial_kernel() -> None:
    kernel = K._weighted_sum_sparse
    assert kernel.on(K.PARALLEL_MIN_ELEMENTS - 1) is kernel.serial
    assert kernel.on(K.PARALLEL_MIN_ELEMENTS) is kernel.parallel
