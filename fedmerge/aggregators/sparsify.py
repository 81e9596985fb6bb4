"""Per-client sparsification steps shared by TIES, DARE and DELLA. Pure functions, explicit RNG.

* :func:`trim` (TIES, Yadav et al. 2023): keep the k = ⌊density·n⌋ entries of largest |τ|.
* :func:`magnitude_outliers` (Model Breadcrumbs, Davari & Belilovsky 2023, as mergekit's
  ``magnitude_outliers``): drop the ⌊γ·n⌋ entries of largest |τ| and then the smallest, keeping
  ⌊density·n⌋.
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
``rescale: true``, its ``rescale_norm: l1``); ``"none"`` keeps the raw masked values (mergekit's
``rescale: false``). The booleans are accepted as mergekit spells them: True → "l1", False → "none".

``keep_rounding`` (the k of a magnitude trim): ``"floor"`` (default) k = ⌊density·n⌋ as peft's
``magnitude_based_pruning`` computes it, k = 0 keeping nothing; ``"mergekit"`` the same floor, but a
trim that would keep nothing is refused, as mergekit's ``sparsify.magnitude`` asserts k > 0
(mergekit a6e4028 / v0.1.4; it does *not* round up to one entry).
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
KEEP_ROUNDINGS = ("floor", "mergekit")


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


def check_rescale(rescale: str | bool) -> str:
    """One of :data:`RESCALES`; mergekit's boolean ``rescale`` maps True → "l1", False → "none"."""
    if isinstance(rescale, bool):
        return "l1" if rescale else "none"
    if rescale not in RESCALES:
        raise ConfigError(f"rescale must be one of {RESCALES} (or a bool, as mergekit), got {rescale!r}")
    return rescale


def check_keep_rounding(keep_rounding: str) -> str:
    if keep_rounding not in KEEP_ROUNDINGS:
        raise ConfigError(f"keep_rounding must be one of {KEEP_ROUNDINGS}, got {keep_rounding!r}")
    return keep_rounding


def keep_count(numel: int, density: float, rounding: str = "floor") -> int:
    """k = ⌊density · numel⌋ (peft's and mergekit's rounding). With ``rounding="mergekit"`` a k of 0 for
    density > 0 is refused, as mergekit's ``magnitude`` asserts (it never keeps "at least one")."""
    k = int(density * numel)
    if rounding == "mergekit" and k == 0 and density > 0 and numel > 0:
        raise ConfigError(
            f"density {density} keeps ⌊{density}·{numel}⌋ = 0 entries of a {numel}-entry tensor; "
            "mergekit refuses such a trim (keep_rounding='mergekit')"
        )
    return k


def magnitude_outliers(
    x: torch.Tensor, density: float, gamma: float, rounding: str = "floor"
) -> torch.Tensor:
    """Model Breadcrumbs' mask (mergekit's ``magnitude_outliers``), fp32: sort |x| ascending, drop the
    n_top = ⌊γ·n⌋ largest and the n_bot = n − ⌊density·n⌋ − n_top smallest (n_top lowered to keep
    ⌊density·n⌋ when n_bot < 0). Density 1 returns x unchanged (γ is then not applied, as mergekit).

    Differs from mergekit where mergekit's slice ``indices[n_bot:-n_top]`` is empty because n_top = 0
    (e.g. γ·n < 1): mergekit then zeroes the whole tensor; here the ⌊density·n⌋ largest are kept.
    Ties in |x| are broken by position (a stable sort); mergekit's sort leaves them unspecified.
    """
    if density >= 1.0:
        return x
    n = x.numel()
    target = keep_count(n, density, rounding)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    flat = x.reshape(-1).float()
    order = torch.sort(flat.abs(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.float32, device=x.device)
    mask[order[n_bot : n - n_top]] = 1.0
    return (flat * mask).reshape(x.shape)


def trim(
    x: torch.Tensor | SparseTensor, density: float, rounding: str = "floor"
) -> torch.Tensor | SparseTensor:
    """Top-k by magnitude with k = ⌊density · numel⌋ of the *dense* tensor (exactly k survive)."""
    if density >= 1.0:
        return x
    if isinstance(x, SparseTensor):
        k = keep_count(x.numel, density, rounding)
        if x.nnz <= k:
            return x
        kept = trim_topk(x.values, k)
        nz = kept != 0
        return SparseTensor(indices=x.indices[nz], values=kept[nz], shape=x.shape)
    return trim_topk(x, keep_count(x.numel(), density, rounding))


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
