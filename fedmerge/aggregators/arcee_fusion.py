"""Arcee Fusion: keep a fine-tune's changes only where they matter (Arcee AI, 2025; mergekit 0.1.5's
``arcee_fusion``), per tensor, between a base x_0 and one model x_1 (weights, not task vectors: the
importance looks at both models' values).

    importance = |x_1 − x_0| ⊙ KL(softmax(x_1) ‖ softmax(x_0))    (softmax and KL along the last axis,
                 each probability + 1e-8; the KL is one number per row, broadcast over it)
    q_25, q_50, q_75 = sorted(importance)[⌊q · (n − 1)⌋]          (index quantiles, as mergekit)
    mask = [importance ≥ q_50 + 1.5 · (q_75 − q_25)]
    x' = x_0 + (x_1 − x_0) ⊙ mask

mergekit samples 10⁶ entries (with replacement, from torch's global generator) for the quantiles of
larger tensors; fedmerge sorts them all (exact; the same on tensors up to 10⁶ entries). x_0 is the
model added with the smaller client id (the recipe adds the base first). Exactly two models; weights
are not used. ``precision`` (float32, float16, bfloat16; default float32): the dtype the importance
and its quantiles are computed in (a recipe's ``dtype``, as mergekit). Not streaming: both inputs
are buffered (2 × P).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from fedmerge.aggregators.base import register
from fedmerge.aggregators.robust import PairAggregator
from fedmerge.errors import ConfigError

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_precision(precision: str) -> str:
    """The name of a compute dtype (mergekit computes a recipe's methods in its ``dtype``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def arcee_fusion(x0: torch.Tensor, x1: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mergekit's Arcee Fusion of base ``x0`` and model ``x1``, the importance and the quantiles computed
    in ``dtype`` (mergekit's operations), the result in fp32 (mergekit's fp32 mask promotes it)."""
    a, b = x0.to(dtype), x1.to(dtype)
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (b - a).abs() * kl
    ordered = torch.sort(importance.reshape(-1)).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[idx]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return a + (b - a) * mask


@register
class ArceeFusion(PairAggregator):
    name: ClassVar[str] = "arcee_fusion"
    pair_note: ClassVar[str] = " (a base and one other)"
    param_attrs: ClassVar[tuple[str, ...]] = ("precision",)

    def __init__(self, *, precision: str = "float32", **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.precision = check_precision(precision)

    def _merge_pair(
        self, key: str, shape: tuple[int, ...], i0: int, i1: int, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        return arcee_fusion(first.reshape(shape), second.reshape(shape), PRECISIONS[self.precision])
