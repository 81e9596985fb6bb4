"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    τ = λ · Σ_i w_i τ_i        (w_i = 1 by default; λ = ``scaling``, typically 0.3–1)

With ``normalize=True`` the sum is divided by Σ_i w_i (a weighted mean, as mergekit's ``normalize``).
Streams in O(P).

Defaults. Batch: λ = 1 (the plain sum; the paper picks λ on held-out data). As a continual merger
(``continual_defaults``, registered as ``continual_task_arithmetic``): λ = 0.3, the value of the
continual task-arithmetic baseline of Tang et al. 2025 (FusionBench ``ContinualTaskArithmeticForCLIP``,
``config/method/opcm/task_arithmetic.yaml``). There experts keep arriving and the merged vector after
t experts is λ · Σ_{i≤t} τ_i, whose norm grows with t, so the scale is smaller than one expert's.
``normalize`` stays False there (its running mean is ``running_average``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.linear import LinearAggregator


@register
class TaskArithmetic(LinearAggregator):
    name: ClassVar[str] = "task_arithmetic"
    continual_defaults: ClassVar[dict[str, Any]] = {"scaling": 0.3}  # FusionBench's λ (module docstring)

    def __init__(self, *, scaling: float = 1.0, normalize: bool = False, **common: object) -> None:
        super().__init__(scaling=scaling, normalize=normalize, **common)
