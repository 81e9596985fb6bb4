"""Continual task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"), sequentially.

    τ⁽ᵗ⁾ = λ · Σ_{i≤t} τ_i          (λ = ``scaling``, default 0.3)

The baseline of Tang et al. 2025 (FusionBench ``ContinualTaskArithmeticForCLIP``, whose config uses
λ = 0.3): each arriving expert adds λ·τ_t to the merged model. State: the running sum Σ τ_i, O(P).
The merged update's norm grows with t (≈ √t for orthogonal experts, t for aligned ones), which is why
the model drifts away from the base as experts accumulate.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.continual.base import ContinualMerger, check_finite_number, register_continual


@register_continual
class ContinualTaskArithmetic(ContinualMerger):
    name: ClassVar[str] = "continual_task_arithmetic"
    slots: ClassVar[tuple[str, ...]] = ("sum",)

    def __init__(self, *, scaling: float = 0.3, device: str | torch.device = "cpu") -> None:
        super().__init__(device=device)
        self.scaling = check_finite_number("scaling", scaling)

    @property
    def params(self) -> dict[str, Any]:
        return {"scaling": self.scaling}

    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        acc = self._slots["sum"]
        if not acc:
            self._slots["sum"] = {k: v.clone() for k, v in tau.items()}
            return
        for k, v in tau.items():
            acc[k].add_(v)

    def _merged(self) -> dict[str, torch.Tensor]:
        return {k: v * self.scaling for k, v in self._slots["sum"].items()}
