"""TSV-C low-rank compression of task vectors: Eckart–Young (the error is exactly the discarded singular
values), the rank rule, and non-matrix tensors untouched."""

from __future__ import annotations

import pytest
import torch

from fedmerge.delta.lowrank import compress_to_rank, low_rank, tsv_compress, tsv_rank
from fedmerge.errors import ConfigError


def task_vector(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(24, 40, generator=g),
        "fc.bias": torch.randn(40, generator=g),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "head.weight": torch.randn(10, 24, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("k", [1, 3, 10, 23])
def test_error_is_the_discarded_singular_values(k: int) -> None:
    x = task_vector(0)["fc.weight"]
    approx, dropped = low_rank(x, k)
    s = torch.linalg.svdvals(x.double())
    assert dropped.numel() == 24 - k
    torch.testing.assert_close(dropped.double(), s[k:], rtol=1e-5, atol=1e-6)
    err = (x.double() - approx.double()).norm() ** 2  # Frobenius² = Σ_{j>k} σ_j²
    torch.testing.assert_close(err, (s[k:] ** 2).sum(), rtol=1e-4, atol=1e-6)
    spectral = torch.linalg.matrix_norm(x.double() - approx.double(), ord=2)  # = σ_{k+1}
    torch.testing.assert_close(spectral, s[k], rtol=1e-4, atol=1e-6)
    assert int(torch.linalg.matrix_rank(approx)) == k


def test_no_rank_k_matrix_is_closer() -> None:
    """Eckart–Young: rank-k projections onto other subspaces are never closer."""
    x = task_vector(1)["fc.weight"]
    best = (x - low_rank(x, 5)[0]).norm()
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        q, _ = torch.linalg.qr(torch.randn(24, 5, generator=g))
        assert (x - q @ (q.T @ x)).norm() >= best - 1e-4


def test_tsv_compress_keeps_one_tth_of_each_matrix_and_the_rest() -> None:
    tv = task_vector(3)
    out = tsv_compress(tv, num_tasks=8)
    assert out.keys() == tv.keys()
    assert int(torch.linalg.matrix_rank(out["fc.weight"])) == 24 // 8 == tsv_rank((24, 40), 8)
    assert int(torch.linalg.matrix_rank(out["head.weight"])) == 1  # ⌊10/8⌋ = 1
    assert out["head.weight"].dtype == torch.float64
    assert out["fc.bias"] is tv["fc.bias"] and out["conv.weight"] is tv["conv.weight"]
    assert tsv_rank((3, 100), 8) == 1  # floored at 1: no matrix is dropped
    # T = 1 keeps every component: the matrix comes back (to rounding)
    torch.testing.assert_close(tsv_compress(tv, 1)["fc.weight"], tv["fc.weight"])


def test_compress_to_rank_and_bad_values() -> None:
    tv = task_vector(4)
    out = compress_to_rank(tv, {"fc.weight": 2, "fc.bias": 1})
    assert int(torch.linalg.matrix_rank(out["fc.weight"])) == 2 and out["fc.bias"] is tv["fc.bias"]
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match="tsv-c-tasks"):
            tsv_compress(tv, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="matrix"):
        low_rank(tv["fc.bias"], 1)
