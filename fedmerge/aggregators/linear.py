"""Shared machinery of the linear methods: τ = λ · Σ_i w_i τ̃_i (optionally divided by Σ_i w_i)."""

from __future__ import annotations

import torch

from fedmerge.aggregators.base import Aggregator, Prepared
from fedmerge.aggregators.kernels import weighted_sum_dense, weighted_sum_sparse
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import AggregatorStateError


class ScaledAggregator(Aggregator):
    """A method whose merge is multiplied by λ (``scaling``, default 1) when it is finalised."""

    def __init__(self, *, scaling: float = 1.0, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.scaling = float(scaling)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "scaling": self.scaling}


class WeightedSumAggregator(ScaledAggregator):
    """Folds Σ_i w_i τ̃_i into one fp32 accumulator per tensor (the fused ``weighted_sum`` kernels)."""

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        weighted_sum_dense([it.data for it in items], weights, self._accumulators(key, 1)[0])  # type: ignore[misc]

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        assert isinstance(item.data, SparseTensor)
        weighted_sum_sparse(item.data.indices, item.data.values, weight, self._accumulators(key, 1)[0])


class LinearAggregator(WeightedSumAggregator):
    """Weighted sum of (prepared) client deltas, scaled by λ; ``normalize`` divides by Σ w."""

    def __init__(self, *, scaling: float = 1.0, normalize: bool = False, **common: object) -> None:
        super().__init__(scaling=scaling, **common)
        self.normalize = bool(normalize)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "normalize": self.normalize}

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        (acc,) = self._accumulators(key, 1)
        factor = self.scaling
        if self.normalize:
            if self._total_weight <= 0:
                raise AggregatorStateError(
                    f"{self.name}: the client weights sum to 0; cannot normalise "
                    "(give at least one client a weight > 0)"
                )
            factor /= self._total_weight
        return acc.mul_(factor)  # the accumulator is not used again: scale it in place
