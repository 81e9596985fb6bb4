"""Shared base of the coordinate-wise robust statistics: they need every client's value per
coordinate, so they buffer all deltas (memory O(N·P), not streaming). For models larger than
memory, merge tensor by tensor (begin with one tensor's shape at a time)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, ClientDelta, DeltaTensor, Prepared, dense_of
from fedmerge.errors import AggregatorStateError


class BufferingAggregator(Aggregator):
    """Buffers every accepted delta, densified, in arrival order; ``_ids[i]`` is the i-th client's id."""

    streaming: ClassVar[bool] = False
    averaging: ClassVar[bool] = True

    def _accepted(self, client_id: str | int, weight: float) -> None:
        super()._accepted(client_id, weight)
        self._ids.append(client_id)  # only once the delta was accepted

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


def id_order(client_id: Any) -> tuple[int, Any]:
    """Sort key of client ids: integers (by value) before strings (by value)."""
    return (0, int(client_id)) if isinstance(client_id, int) else (1, str(client_id))


class PairAggregator(BufferingAggregator):
    """A merge of exactly two models (slerp, nuslerp, nearswap, arcee_fusion): a third ``add`` is refused
    (:class:`AggregatorStateError`), and each tensor is ``_merge_pair(key, shape, i0, i1, first, second)``
    with the two buffered deltas ordered by client id (:func:`id_order`); one model alone is itself."""

    exact_models: ClassVar[int] = 2
    pair_note: ClassVar[str] = ""  # said after "merges exactly two models" when a third arrives

    def _admit(self, client_id: str | int, client_delta: ClientDelta) -> ClientDelta:
        if self._num_clients >= 2:
            raise AggregatorStateError(
                f"{self.name} merges exactly two models{self.pair_note}; a third was added"
            )
        return super()._admit(client_id, client_delta)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._buffers.pop(key)
        if len(buf) == 1:
            return buf[0]
        i0, i1 = sorted(range(2), key=lambda i: id_order(self._ids[i]))
        return self._merge_pair(key, shape, i0, i1, buf[i0], buf[i1])

    @abstractmethod
    def _merge_pair(
        self, key: str, shape: tuple[int, ...], i0: int, i1: int, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        """The merged delta of one tensor from the first and second model's (flattened) deltas."""

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:  # pragma: no cover - _finalize_tensor overrides
        raise NotImplementedError
