"""Robust TIES: TIES-Merging (Yadav et al. 2023) hardened against a minority of hostile clients.

    equalise:  τ̃_i = τ_i · m / ‖τ_i‖₂,   m = median_j ‖τ_j‖₂      (zero deltas stay zero; off with
               ``equalize_norms=False``) — a scaled (model-replacement) client loses its leverage
    trim:      τ̂_i = top-k(τ̃_i) by |·| per tensor, k = ⌊density · n⌋     (as TIES)
    elect:     γ_j = sgn(Σ_i sgn(τ̂_ij))     count-based: one client, one vote whatever its magnitude;
               a tied vote elects +, as TIES
    merge:     τ_j = λ · median{τ̂_ij : sgn(τ̂_ij) = γ_j}    (median of the agreeing non-zero entries;
               the mean of the two middle ones for an even count; 0 if none agree)

Unweighted (weights are ignored: a weight would let one client buy the vote or the median). The
median needs every client's value per coordinate, so this buffers all deltas: memory O(N·P)
(``streaming = False``). ``client_norms`` keeps the original norms of the last merge.
"""

from __future__ import annotations

import statistics
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import check_fraction, register
from fedmerge.aggregators.kernels import topk_threshold
from fedmerge.aggregators.robust import BufferingAggregator
from fedmerge.aggregators.sparsify import keep_count


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = ⌊density·n⌋ largest |x_j| (ties at the threshold in flat order, as TIES)."""
    flat = x.reshape(-1)
    if density >= 1.0:
        return torch.ones_like(flat, dtype=torch.bool)
    t, cut = topk_threshold(flat, keep_count(flat.numel(), density))
    a = flat.abs()
    return (a > t) | ((a == t) & (torch.arange(flat.numel()) < cut))


def agreeing_median(stacked: torch.Tensor) -> torch.Tensor:
    """Count-elected sign, then the median of the entries with that sign, per column of (N, numel)."""
    signs = torch.sign(stacked)
    gamma = torch.where(signs.sum(dim=0) >= 0, 1.0, -1.0)
    agree = signs == gamma
    count = agree.sum(dim=0)
    fill = torch.tensor(float("inf"))
    ordered = torch.where(agree, stacked, fill).sort(dim=0).values  # agreeing values first
    lo = ((count - 1).clamp(min=0) // 2).unsqueeze(0)
    hi = (count // 2).clamp(max=stacked.shape[0] - 1).unsqueeze(0)
    med = (ordered.gather(0, lo) + ordered.gather(0, hi)).squeeze(0) / 2
    return torch.where(count > 0, med, torch.zeros(()))


@register
class RobustTies(BufferingAggregator):
    tensorwise: ClassVar[bool] = False  # scores whole deltas (over every tensor at once)
    name: ClassVar[str] = "robust_ties"
    identity_params: ClassVar[dict[str, Any]] = {"density": 1.0}
    param_attrs: ClassVar[tuple[str, ...]] = ("density", "scaling", "equalize_norms")

    def __init__(
        self, *, density: float = 0.2, scaling: float = 1.0, equalize_norms: bool = True, **common: Any
    ) -> None:
        super().__init__(**common)
        self.density = check_fraction("density", density)
        self.scaling = float(scaling)
        self.equalize_norms = bool(equalize_norms)
        self.client_norms: dict[Any, float] = {}

    def begin(self, reference_shapes):
        super().begin(reference_shapes)
        self._sq: dict[str, list[float]] = {}
        self.client_norms = {}

    def finalize(self) -> dict[str, torch.Tensor]:
        self._require_begun()
        self._flush()
        if self._num_clients:
            sq = torch.zeros(self._num_clients, dtype=torch.float64)
            for rows in self._buffers.values():
                sq += torch.stack(rows).to(torch.float64).pow(2).sum(dim=1)
            norms = sq.sqrt().tolist()
            self.client_norms = dict(zip(self._ids, norms, strict=True))
            target = statistics.median(norms)
            self._factors = [target / n if (n > 0 and self.equalize_norms) else 1.0 for n in norms]
        return super().finalize()

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        rows = []
        for i, row in enumerate(stacked):
            scaled = row * self._factors[i] if self._factors[i] != 1.0 else row
            rows.append(torch.where(topk_mask(scaled, self.density), scaled, torch.zeros(())))
        return agreeing_median(torch.stack(rows)) * self.scaling
