"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    τ = λ · Σ_i w_i τ_i        (w_i = 1 by default; λ = ``scaling``, typically 0.3–1)

With ``normalize=True`` the sum is divided by Σ_i w_i (a weighted mean, as mergekit's ``normalize``).
Streams in O(P).
"""

from __future__ import annotations

from typing import ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.linear import LinearAggregator


@register
class TaskArithmetic(LinearAggregator):
    name: ClassVar[str] = "task_arithmetic"

    def __init__(self, *, scaling: float = 1.0, normalize: bool = False, **common: object) -> None:
        super().__init__(scaling=scaling, normalize=normalize, **common)
