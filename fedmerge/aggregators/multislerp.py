"""Multi-SLERP: a weighted spherical mean of N tensors (Goddard 2025, "multislerp", mergekit's
``multislerp``: barycentric interpolation on the hypersphere through the tangent space at the
weighted mean direction).

    ŵ_i = w_i / Σ w,  ‖x_i‖ norms,  u_i = x_i / (‖x_i‖ + eps)
    M = Σ ŵ_i u_i,  m = M / ‖M‖,  g = Σ ŵ_i (u_i − ⟨u_i, m⟩ m) = M − ⟨M, m⟩ m,  γ = ‖g‖ + eps
    τ = (m cos γ + g sin γ / γ) · Σ ŵ_i ‖x_i‖

Since g is (up to rounding) 0, the result is the normalised weighted mean direction scaled by the
weighted mean norm. fedmerge's inputs are deltas, so this is mergekit's multislerp *with* a
``base_model`` (which subtracts the base and adds it back); without a base mergekit interpolates the
weights themselves — give full weights as the "deltas" for that. One model is returned unchanged.
‖M‖ < eps: two models are linearly interpolated (ŵ_0 x_0 + ŵ_1 x_1), as mergekit; with more models
mergekit raises, and so does this unless every input is 0 (then 0, where mergekit raises).

Streams: three O(P) fp32 accumulators — Σ w u, Σ w x (for the fallbacks), and Σ w ‖x‖ kept in
element 0 of the third (whole tensors only: the norms are per tensor). Weights summing to 0 are
refused (mergekit divides by it).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, Prepared, dense_of, register
from fedmerge.errors import AggregatorStateError


@register
class MultiSlerp(Aggregator):
    name: ClassVar[str] = "multislerp"
    averaging: ClassVar[bool] = True
    param_attrs: ClassVar[tuple[str, ...]] = ("eps", "scaling")

    def __init__(self, *, eps: float = 1e-8, scaling: float = 1.0, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.eps = float(eps)
        self.scaling = float(scaling)

    def _fold_one(self, key: str, x: torch.Tensor, weight: float) -> None:
        su, sx, sn = self._accumulators(key, 3)
        flat = x.reshape(-1).to(self.device, torch.float32)
        norm = torch.linalg.vector_norm(flat)
        su.add_(flat / (norm + self.eps) * weight)  # u then ×w: antipodal inputs cancel exactly
        sx.add_(flat, alpha=weight)
        sn[0] += weight * float(norm)

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        for it, w in zip(items, weights, strict=True):
            self._fold_one(key, dense_of(it.data), w)

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        self._fold_one(key, dense_of(item.data), weight)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        su, sx, sn = self._accumulators(key, 3)
        total = self._total_weight
        if total <= 0:
            raise AggregatorStateError(f"{self.name}: the client weights sum to 0; cannot normalise them")
        if self._num_clients == 1:
            return sx / total * self.scaling
        mean = su / total
        mean_norm = float(torch.linalg.vector_norm(mean))
        avg_norm = float(sn[0]) / total
        if mean_norm < self.eps:
            if self._num_clients == 2:
                return sx / total * self.scaling
            if avg_norm == 0.0:
                return torch.zeros_like(su)
            raise AggregatorStateError(
                f"{self.name}: the weighted sum of the unit directions of {key!r} is zero (antipodal inputs "
                "whose weights cancel); change the weights"
            )
        m = mean / mean_norm
        g = mean - (mean * m).sum() * m
        gamma = torch.linalg.vector_norm(g) + self.eps
        out = m * torch.cos(gamma) + g * (torch.sin(gamma) / gamma)
        return out * (avg_norm * self.scaling)
