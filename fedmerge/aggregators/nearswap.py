"""NearSwap: take the fine-tuned model's value only where it is near the base's (alchemonaut,
QuartetAnemoi-70B-t0.0001, 2024; mergekit 0.1.5's ``nearswap``), per coordinate, between a base x_0
and one model x_1 (weights):

    w = clamp(t / max(|x_0 − x_1|, 1e-6), 0, 1),    x' = w ⊙ x_1 + (1 − w) ⊙ x_0

coordinates that moved by at most ``t`` are taken whole from x_1, larger moves are shrunk to a step of
size ``t`` from x_0 toward x_1. ``t`` ≥ 0 (mergekit requires it; the reference model used 1e-4).
x_0 is the model added with the smaller client id (the recipe adds the base first). Exactly two
models; weights are not used. Not streaming: both inputs are buffered (2 × P).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedmerge.aggregators.base import register
from fedmerge.aggregators.robust import PairAggregator
from fedmerge.errors import ConfigError


def nearswap(t: float, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """mergekit's NearSwap of base ``x0`` and model ``x1`` (fp32)."""
    a, b = x0.float(), x1.float()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


@register
class NearSwap(PairAggregator):
    name: ClassVar[str] = "nearswap"
    pair_note: ClassVar[str] = " (a base and one other)"
    param_attrs: ClassVar[tuple[str, ...]] = ("t",)

    def __init__(self, *, t: float = 1e-4, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"nearswap: t must be a finite number ≥ 0, got {t!r}")
        self.t = float(t)

    def _merge_pair(
        self, key: str, shape: tuple[int, ...], i0: int, i1: int, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        return nearswap(self.t, first, second)
