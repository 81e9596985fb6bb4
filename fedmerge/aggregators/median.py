"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates"; Flower's FedMedian).

    τ_j = median_i τ_{i, j}      (mean of the two middle values when N is even, as numpy's median)

Unweighted (weights are ignored: a weight would let one client buy the median). Buffers all
deltas: memory O(N·P).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import register
from fedmerge.aggregators.robust import BufferingAggregator


@register
class Median(BufferingAggregator):
    name: ClassVar[str] = "median"

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.shape[0]
        ordered = stacked.sort(dim=0).values
        if n % 2:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2
