"""Shared base of the coordinate-wise robust statistics: they need every client's value per
coordinate, so they buffer all deltas (memory O(N·P), not streaming). For models larger than
memory, merge tensor by tensor (begin with one tensor's shape at a time)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, ClientDelta, DeltaTensor, Prepared, dense_of


class BufferingAggregator(Aggregator):
    """Buffers every accepted delta, densified, in arrival order; ``_ids[i]`` is the i-th client's id."""

    streaming: ClassVar[bool] = False
    averaging: ClassVar[bool] = True

    def add(
        self,
        client_delta: ClientDelta,
        weight: float = 1.0,
        *,
        client_id: str | int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        cid = self._num_clients if client_id is None else client_id
        super().add(client_delta, weight, client_id=cid, generator=generator)
        self._ids.append(cid)  # only once the delta was accepted

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        return Prepared(dense_of(x))  # one path for every client: buffers stay in arrival order

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        buf = self._buffers.setdefault(key, [])
        buf.extend(dense_of(it.data).reshape(-1).to(self.device, torch.float32) for it in items)

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        self._fold_dense(key, [item], [weight])

    def begin(self, reference_shapes):
        super().begin(reference_shapes)
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._ids: list[Any] = []

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        stacked = torch.stack(self._buffers.pop(key))  # (N, numel)
        return self._reduce(stacked)

    @abstractmethod
    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Coordinate-wise statistic over dim 0."""
