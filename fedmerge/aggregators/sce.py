"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models",
arXiv 2408.07990, §3.3; mergekit 0.1.5's ``sce``), per tensor over the task vectors τ_i = θ_i − θ_base.

    Select:    with ``select_topk`` = k_f < 1, keep the ⌊k_f · nnz(v)⌋ coordinates of largest variance
               v_j = Var_i τ_{i,j} (population variance across models; nnz counts v_j ≠ 0) in every τ_i
    Calculate: η_i = mean_j τ_{i,j}² / Σ_l mean_j τ_{l,j}²   (1/N when the sum is below 1e-6)
    Erase:     m_{i,j} = [sign τ_{i,j} = sign Σ_l τ_{l,j}]  (sign of the sum, ≥ 0 counting as +;
               a zero entry never agrees)
    τ'_j = Σ_i η_i m_{i,j} τ_{i,j} / max(Σ_i η_i m_{i,j}, 1e-6)

The per-model ``weight`` is not used (the weights η come from the task vectors, as in the paper and
mergekit). ``select_topk`` ∈ [0, 1], default 1 (no selection; mergekit's default). ``precision``
(float32, float16, bfloat16; default float32) is the dtype the formula is computed in: a recipe's
``dtype`` (mergekit computes in it; in bf16 the variances tie and the selection depends on it).
``int8_mask`` is accepted for mergekit recipes and changes nothing (the dtype of mergekit's mask).
Not streaming: the variance, the mean squares and the sign of the sum need every task vector of
the tensor (N × P).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.arcee_fusion import PRECISIONS, check_precision
from fedmerge.aggregators.base import check_fraction, register
from fedmerge.aggregators.robust import BufferingAggregator


def sce_select_mask(tvs: torch.Tensor, select_topk: float) -> torch.Tensor:
    """0/1 mask (over one model's coordinates) of the ⌊k_f · nnz(var)⌋ largest-variance coordinates."""
    if select_topk <= 0:
        return torch.zeros_like(tvs[0])
    if select_topk >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce(tvs: torch.Tensor, select_topk: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SCE of stacked task vectors ``tvs`` (N, …), computed in ``dtype`` with mergekit's operations in
    mergekit's order (so that a bf16 recipe selects and rounds as mergekit does); returned in fp32."""
    x = tvs.to(dtype)
    if select_topk < 1:
        x = x * sce_select_mask(x, select_topk).unsqueeze(0)
    majority = torch.where(x.sum(dim=0) >= 0, 1.0, -1.0)
    erase = (x.sign() == majority).to(x.dtype)
    ms = x.square().reshape(x.shape[0], -1).mean(dim=1)
    total = float(ms.sum())
    eta = torch.full_like(ms, 1.0 / ms.shape[0]) if abs(total) < 1e-6 else ms / total
    eta = eta.reshape(-1, *([1] * (x.dim() - 1)))
    erased = eta * erase
    return ((x * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)).float()


@register
class SCE(BufferingAggregator):
    name: ClassVar[str] = "sce"
    averaging: ClassVar[bool] = True  # identical τ: η = 1/N, every sign agrees → τ
    param_attrs: ClassVar[tuple[str, ...]] = ("select_topk", "int8_mask", "precision")

    def __init__(
        self,
        *,
        select_topk: float = 1.0,
        int8_mask: bool = False,
        precision: str = "float32",
        **common: object,
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.select_topk = check_fraction("select_topk", select_topk)
        self.int8_mask = bool(int8_mask)
        self.precision = check_precision(precision)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        # sorted by client id: the result does not depend on the arrival order (up to fp32 sums)
        order = sorted(range(len(self._ids)), key=lambda i: str(self._ids[i]))
        buf = self._buffers.pop(key)
        return sce(torch.stack([buf[i] for i in order]), self.select_topk, PRECISIONS[self.precision])

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:  # pragma: no cover - _finalize_tensor overrides
        raise NotImplementedError
