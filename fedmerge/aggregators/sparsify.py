"""Per-client sparsification steps shared by TIES, DARE and DELLA. Pure functions, explicit RNG.

* :func:`trim` (TIES, Yadav et al. 2023): keep the k = ⌊density·n⌋ entries of largest |τ|.
* :func:`magnitude_threshold` / :func:`trim_at`: the k-th largest |τ| over one tensor or several
  together, and the trim that keeps every entry at or above it (ties included; continual TIES,
  FusionBench's rule, trims the whole model at once this way).
* :func:`dare_drop` (DARE, Yu et al. 2024): m ~ Bernoulli(density) i.i.d.; τ̃ = m ⊙ τ / density.
* :func:`della_drop` (DELLA, Deep et al. 2024, as mergekit's ``della_magprune``): within each row,
  rank entries by |τ| (rank 1 = smallest), normalise ranks to r ∈ [0, 1], keep each entry with
  probability p = (density − ε) + 2ε·r and rescale kept entries by 1/p.

Masks: ``mask_rng="splitmix64"`` (default) draws u_j = output j of SplitMix64 seeded from the
client's generator and keeps entry j iff u_j < p_j — counter-based, so it is computed in one
parallel pass and anyone holding the seed (a client, a secure-aggregation peer) regenerates the
same mask. ``mask_rng="torch"`` uses ``torch.bernoulli(..., generator)``, the draw peft makes.

``rescale``: ``"inverse"`` divides by the keep probability (the papers' unbiased estimator, as peft
and FusionBench do); ``"l1"`` instead rescales the kept entries so that ‖τ̃‖₁ = ‖τ‖₁ (mergekit's
``rescale_norm: l1``); ``"none"`` keeps the raw masked values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fedmerge.aggregators.kernels import seeded_bernoulli_scale, seeded_uniform, topk_threshold, trim_topk
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError
from fedmerge.seeds import seed_from_generator

Rescale = Literal["inverse", "l1", "none"]
RESCALES = ("inverse", "l1", "none")
MASK_RNGS = ("splitmix64", "torch")


def check_mask_rng(mask_rng: str) -> str:
    if mask_rng not in MASK_RNGS:
        raise ConfigError(f"mask_rng must be one of {MASK_RNGS}, got {mask_rng!r}")
    return mask_rng


def _keep(
    shape: tuple[int, ...],
    probs: torch.Tensor | float,
    generator: torch.Generator,
    mask_rng: str,
    device: torch.device,
) -> torch.Tensor:
    """A 0/1 fp32 mask with P(keep_j) = probs_j."""
    if mask_rng == "torch":
        p = (
            probs
            if isinstance(probs, torch.Tensor)
            else torch.full(shape, probs, dtype=torch.float32, device=device)
        )
        return torch.bernoulli(p, generator=generator)
    n = 1
    for d in shape:
        n *= d
    u = seeded_uniform(n, seed_from_generator(generator), device).reshape(shape)
    return (u < probs).float()


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


def magnitude_threshold(tensors: Sequence[torch.Tensor], density: float) -> float:
    """t = the k-th largest |x| over all ``tensors`` together, k = ⌊density · total size⌋
    (:func:`keep_count`); 0 when density keeps everything, inf when it keeps nothing."""
    flat = tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
    threshold, _ = topk_threshold(flat, keep_count(flat.numel(), density))
    return threshold


def trim_at(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with the entries of |x| < ``threshold`` zeroed; entries equal to it are all kept (unlike
    :func:`trim`, which breaks ties by position to keep exactly k)."""
    return torch.where(x.abs() >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


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
    x: torch.Tensor | SparseTensor,
    density: float,
    generator: torch.Generator,
    rescale: str = "inverse",
    mask_rng: str = "splitmix64",
) -> torch.Tensor | SparseTensor:
    """DARE: m ~ Bernoulli(density) per entry, τ̃ = rescale(m ⊙ τ). Density 1 returns τ unchanged.

    With ``mask_rng="torch"`` a dense fp32 tensor gets ``torch.bernoulli(full(density), generator)``,
    the same draw as peft, so a generator seeded like peft's global RNG reproduces peft's mask.
    """
    if density >= 1.0:
        return x
    if isinstance(x, SparseTensor):
        mask = _keep(tuple(x.values.shape), density, generator, mask_rng, x.values.device)
        return SparseTensor(
            indices=x.indices, values=_rescaled(x.values, mask, density, rescale), shape=x.shape
        )
    if mask_rng == "splitmix64" and rescale != "l1":  # fused mask-and-scale, one pass
        return seeded_bernoulli_scale(
            x, density, 1.0 / density if rescale == "inverse" else 1.0, seed_from_generator(generator)
        )
    return _rescaled(x, _keep(tuple(x.shape), density, generator, mask_rng, x.device), density, rescale)


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
    x: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: str = "inverse",
    mask_rng: str = "splitmix64",
) -> torch.Tensor:
    """DELLA's MAGPRUNE: magnitude-ranked keep probabilities, Bernoulli mask, rescale by 1/p."""
    if density >= 1.0:
        return x
    probs = della_keep_probabilities(x, density, epsilon)
    mask = _keep(tuple(x.shape), probs, generator, mask_rng, x.device)
    return _rescaled(x, mask, probs, rescale)
