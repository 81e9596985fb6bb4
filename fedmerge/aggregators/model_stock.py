"""Model Stock (Jang, Yun & Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned
models"), as mergekit's ``model_stock``.

    cos θ = mean over pairs i < j of ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖)       (per tensor, or per row)
    t = N cos θ / (1 + (N − 1) cos θ)
    τ = λ · t · (1/N) Σ_i τ_i              (θ_H = t·θ_avg + (1 − t)·θ_0, written as a delta)

The paper defines θ from two fine-tuned models; mergekit (and this) take the mean pairwise cosine
for N > 2. Streams, because Σ_{i<j} cos_ij = (‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / 2 with u_i = τ_i/‖τ_i‖:
three O(P) fp32 accumulators — Σ τ_i, Σ u_i, and the per-row count Σ ‖u_i‖² (0 or 1 per model) in
the first rows entries of the third. ``filter_wise`` (mergekit's option): one t per row along the
last dimension (a 1-D tensor is one row), else one t per tensor.

Weights are ignored (an unweighted mean, as the paper and mergekit). Differences from mergekit
(a6e4028 / v0.1.4): it divides by max(‖τ_i‖‖τ_j‖, 1e-6) and clamps each cosine to [−1, 1]; here
a zero τ_i has u_i = 0 and other norms are exact (the same unless ‖τ_i‖‖τ_j‖ < 1e-6). One model:
t = 1 (mergekit needs two); 1 + (N − 1) cos θ = 0 gives t = 0 (mergekit: inf/NaN).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, Prepared, dense_of, register


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if not filter_wise or x.dim() == 0:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


@register
class ModelStock(Aggregator):
    name: ClassVar[str] = "model_stock"
    averaging: ClassVar[bool] = True
    param_attrs: ClassVar[tuple[str, ...]] = ("filter_wise", "scaling")

    def __init__(self, *, filter_wise: bool = False, scaling: float = 1.0, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.filter_wise = bool(filter_wise)
        self.scaling = float(scaling)

    def _fold_one(self, key: str, x: torch.Tensor) -> None:
        assert self._shapes is not None
        s, su, cnt = self._accumulators(key, 3)
        x32 = x.to(self.device, torch.float32).reshape(self._shapes[key])
        rows = _rows(x32, self.filter_wise)
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        nonzero = norms > 0
        units = torch.where(nonzero, rows / torch.where(nonzero, norms, torch.ones_like(norms)), 0.0)
        s.add_(x32.reshape(-1))
        su.add_(units.reshape(-1))
        cnt[: rows.shape[0]].add_(nonzero.reshape(-1).float())

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        for it in items:
            self._fold_one(key, dense_of(it.data))

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        self._fold_one(key, dense_of(item.data))

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        s, su, cnt = self._accumulators(key, 3)
        n = self._num_clients
        mean = s / n
        if n == 1:
            return mean * self.scaling
        urows = _rows(su.reshape(shape), self.filter_wise)
        count = cnt[: urows.shape[0]].reshape(-1, 1)
        cos = (urows.pow(2).sum(dim=1, keepdim=True) - count) / (n * (n - 1))
        denom = 1 + (n - 1) * cos
        t = torch.where(denom != 0, n * cos / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
        mrows = _rows(mean.reshape(shape), self.filter_wise)
        return (mrows * t * self.scaling).reshape(-1)
