"""LoRA adapters merged with a registered method by name.

:func:`fedmerge.delta.lora.merge_lora` merges adapters in product, stack or factor space and takes the
merge function as an argument; this is that function with a method of the registry bound:
``aggregator="ties"`` merges the dense ΔW_i = s_i·B_i·A_i with
``fedmerge.aggregators.merge("ties", deltas, weights, **params)`` and re-factorises the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmerge.aggregators.base import merge
from fedmerge.delta.lora import DenseAggregator, LoraAdapter, Space
from fedmerge.delta.lora import merge_lora as merge_lora_with


def merge_lora(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    space: Space = "product",
    aggregator: str | DenseAggregator | None = None,
    *,
    rank: int | None = None,
    **params: Any,
) -> LoraAdapter:
    """:func:`fedmerge.delta.lora.merge_lora` where ``aggregator`` may also name a registered method
    (``params`` are its parameters); None or a merge function are passed through unchanged."""
    if not isinstance(aggregator, str):
        return merge_lora_with(adapters, weights, space, aggregator, rank=rank, **params)
    name = aggregator

    def by_name(
        deltas: Sequence[Mapping[str, torch.Tensor]], ws: Sequence[float]
    ) -> Mapping[str, torch.Tensor]:
        return merge(name, [dict(d) for d in deltas], ws, **params)

    return merge_lora_with(adapters, weights, space, by_name, rank=rank)
