"""Running average of the experts (continual weight averaging; Wortsman et al. 2022, "Model soups").

    τ⁽ᵗ⁾ = (1/t) Σ_{i≤t} τ_i,   updated as  τ⁽ᵗ⁾ = ((t − 1) τ⁽ᵗ⁻¹⁾ + τ_t) / t

The averaging baseline of Tang et al. 2025 (FusionBench ``ContinualWeightAverageForCLIP``, which
applies the same update to the parameters θ; averaging θ_i and averaging τ_i give the same model).
No hyper-parameter. State: the current mean, O(P). Each expert's contribution shrinks as 1/t.

Mathematically this is FedAvg (:mod:`fedmerge.aggregators.fedavg`) with unit weights, but it keeps its
own class rather than being the batch aggregator plus state
(:mod:`fedmerge.aggregators.continual.batch`): FedAvg's state is the sum Σ τ_i and its result
Σ τ_i · (1/t), which rounds differently from this recursion, and stored tracks persist the mean
(slot ``mean``), which cannot be turned back into FedAvg's sum exactly. Switching would change the
returned numbers (in the last bits) and resume stored tracks only approximately. The two agree to
fp32 rounding (tested).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.continual.base import ContinualMerger, register_continual


@register_continual
class RunningAverage(ContinualMerger):
    name: ClassVar[str] = "running_average"
    slots: ClassVar[tuple[str, ...]] = ("mean",)

    def __init__(self, *, device: str | torch.device = "cpu") -> None:
        super().__init__(device=device)

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        mean = self._slots["mean"]
        if not mean:
            self._slots["mean"] = {k: v.clone() for k, v in tau.items()}
            return
        t = self._num_merged + 1
        for k, v in tau.items():
            mean[k].mul_(t - 1).add_(v).div_(t)

    def _merged(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._slots["mean"].items()}
