"""Shared base of the coordinate-wise robust statistics: they need every client's value per
coordinate, so they buffer all deltas (memory O(N·P), not streaming). For models larger than
memory, merge tensor by tensor (begin with one tensor's shape at a time)."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, Prepared, dense_of


class BufferingAggregator(Aggregator):
    streaming: ClassVar[bool] = False
    averaging: ClassVar[bool] = True

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        buf = self._buffers.setdefault(key, [])
        buf.extend(dense_of(it.data).reshape(-1).to(self.device, torch.float32) for it in items)

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        self._fold_dense(key, [item], [weight])

    def begin(self, reference_shapes):
        super().begin(reference_shapes)
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        stacked = torch.stack(self._buffers.pop(key))  # (N, numel)
        return self._reduce(stacked)

    @abstractmethod
    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Coordinate-wise statistic over dim 0."""
