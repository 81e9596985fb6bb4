"""Per-client sparsification steps shared by TIES, DARE and DELLA. Pure functions, explicit RNG.

* :func:`trim` (TIES, Yadav et al. 2023): keep the k = ⌊density·n⌋ entries of largest |τ|.
* :func:`dare_drop` (DARE, Yu et al. 2024): m ~ Bernoulli(density) i.i.d.; τ̃ = m ⊙ τ / density.
* :func:`della_drop` (DELLA, Deep et al. 2024, as mergekit's ``della_magprune``): within each row,
  rank entries by |τ| (rank 1 = smallest), normalise ranks to r ∈ [0, 1], keep each entry with
  probability p = (density − ε) + 2ε·r and rescale kept entries by 1/p.

``rescale``: ``"inverse"`` divides by the keep probability (the papers' unbiased estimator, as peft
and FusionBench do); ``"l1"`` instead rescales the kept entries so that ‖τ̃‖₁ = ‖τ‖₁ (mergekit's
``rescale_norm: l1``); ``"none"`` keeps the raw masked values.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedmerge.aggregators.kernels import trim_topk
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError

Rescale = Literal["inverse", "l1", "none"]
RESCALES = ("inverse", "l1", "none")


def check_rescale(rescale: str) -> str:
    if rescale not in RESCALES:
        raise ConfigError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    return rescale


def keep_count(numel: int, density: float) -> int:
    """k = ⌊density · numel⌋, as peft and mergekit compute it."""
    return int(density * numel)


def trim(x: torch.Tensor | SparseTensor, density: float) -> torch.Tensor | SparseTensor:
    """Top-k by magnitude with k = ⌊density · numel⌋ of the *dense* tensor (exactly k survive)."""
    if density >= 1.0:
        return x
    if isinstance(x, SparseTensor):
        k = keep_count(x.numel, density)
        if x.nnz <= k:
            return x
        kept = trim_topk(x.values, k)
        nz = kept != 0
        return SparseTensor(indices=x.indices[nz], values=kept[nz], shape=x.shape)
    return trim_topk(x, keep_count(x.numel(), density))


def _rescaled(
    x: torch.Tensor, mask: torch.Tensor, keep_prob: torch.Tensor | float, rescale: str
) -> torch.Tensor:
    x32 = x.float()
    kept = x32 * mask
    if rescale == "inverse":
        return kept / keep_prob
    if rescale == "l1":
        before, after = x32.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


def dare_drop(
    x: torch.Tensor | SparseTensor, density: float, generator: torch.Generator, rescale: str = "inverse"
) -> torch.Tensor | SparseTensor:
    """DARE: m ~ Bernoulli(density) per entry, τ̃ = rescale(m ⊙ τ). Density 1 returns τ unchanged.

    For a dense fp32 tensor the mask is ``torch.bernoulli(full(density), generator)``, the same
    draw peft makes, so a generator seeded like peft's global RNG gives peft's mask.
    """
    if density >= 1.0:
        return x
    if isinstance(x, SparseTensor):
        vals = x.values
        mask = torch.bernoulli(
            torch.full(vals.shape, density, dtype=torch.float32, device=vals.device), generator=generator
        )
        return SparseTensor(indices=x.indices, values=_rescaled(vals, mask, density, rescale), shape=x.shape)
    mask = torch.bernoulli(
        torch.full(x.shape, density, dtype=torch.float32, device=x.device), generator=generator
    )
    return _rescaled(x, mask, density, rescale)


def della_keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (density − ε) + 2ε·r with r the row-wise magnitude rank normalised to [0, 1] (1-D: one row)."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float() + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    r = ((ranks - lo) / span).clamp(0, 1)
    return ((density - epsilon) + r * 2 * epsilon).reshape(x.shape)


def della_drop(
    x: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: str = "inverse"
) -> torch.Tensor:
    """DELLA's MAGPRUNE: magnitude-ranked keep probabilities, Bernoulli mask, rescale by 1/p."""
    if density >= 1.0:
        return x
    probs = della_keep_probabilities(x, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    return _rescaled(x, mask, probs, rescale)
