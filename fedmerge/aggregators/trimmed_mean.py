"""Coordinate-wise trimmed mean (Yin et al. 2018; Flower's FedTrimmedAvg).

    k = ⌊β · N⌋;  τ_j = mean of the N − 2k values left after removing the k smallest and the k
    largest of {τ_{i, j}}_i               (β = ``beta``, 0 ≤ β < 0.5; N − 2k ≥ 1 required)

Unweighted, as scipy's ``trim_mean``. Buffers all deltas: memory O(N·P).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import check_fraction, register
from fedmerge.aggregators.robust import BufferingAggregator
from fedmerge.errors import AggregatorStateError, ConfigError


@register
class TrimmedMean(BufferingAggregator):
    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.beta = check_fraction("beta", beta)
        if self.beta >= 0.5:
            raise ConfigError(f"beta must be < 0.5 (it trims that fraction from each end), got {beta}")

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "beta": self.beta}

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.shape[0]
        k = int(self.beta * n)
        if n - 2 * k < 1:
            raise AggregatorStateError(f"trimmed_mean with beta={self.beta} trims all {n} clients")
        ordered = stacked.sort(dim=0).values
        return ordered[k : n - k].mean(dim=0)
