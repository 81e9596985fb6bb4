"""Sequential MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning"): keep, per coordinate, the largest-magnitude value seen so far.

    m⁽ᵗ⁾_j = τ_{i*, j},  i* = argmax_{i≤t} |τ_{i, j}|;      τ⁽ᵗ⁾ = λ · m⁽ᵗ⁾   (λ = ``scaling``, default 0.5)

Max-magnitude selection is associative, so folding experts one at a time gives exactly the batch
result (:mod:`fedmerge.aggregators.magmax`); on an exact tie in magnitude the positive value wins, so
the result does not depend on the order. λ = 0.5 is the paper's and FusionBench's default. The paper
fine-tunes each expert from the previous one (sequential fine-tuning); here experts are whatever the
clients send, usually fine-tuned from the shared base. State: m⁽ᵗ⁾, O(P).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.continual.base import ContinualMerger, check_finite_number, register_continual
from fedmerge.aggregators.kernels import max_abs_dense


@register_continual
class SequentialMagMax(ContinualMerger):
    name: ClassVar[str] = "magmax"
    slots: ClassVar[tuple[str, ...]] = ("maxabs",)

    def __init__(self, *, scaling: float = 0.5, device: str | torch.device = "cpu") -> None:
        super().__init__(device=device)
        self.scaling = check_finite_number("scaling", scaling)

    @property
    def params(self) -> dict[str, Any]:
        return {"scaling": self.scaling}

    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        acc = self._slots["maxabs"]
        if not acc:
            self._slots["maxabs"] = {k: v.clone() for k, v in tau.items()}
            return
        for k, v in tau.items():
            flat = acc[k].view(-1)
            max_abs_dense([v], flat)

    def _merged(self) -> dict[str, torch.Tensor]:
        return {k: v * self.scaling for k, v in self._slots["maxabs"].items()}
