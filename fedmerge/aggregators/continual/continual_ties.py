"""Continual TIES-Merging (Yadav et al. 2023, "TIES-Merging"), as the baseline of Tang et al. 2025.

FusionBench's ``ContinualTiesMergingForCLIP`` TIES-merges two vectors at every arrival — the merged
task vector so far and the new expert — and adds the result, scaled, to the merged model::

    τ⁽¹⁾ = λ τ_1
    τ⁽ᵗ⁾ = τ⁽ᵗ⁻¹⁾ + λ · TIES(τ⁽ᵗ⁻¹⁾, τ_t)
    TIES(a, b):  â, b̂ = trim(a), trim(b)             keep the k = ⌊density·P⌋ largest |·| of each
                 γ = sgn(â + b̂);  γ = 0 → sgn(Σ_j γ_j)   (zero votes take the global majority sign)
                 out_j = Σ_{x∈{â,b̂}} x_j · [sgn(x_j) = γ_j]   (disjoint *sum*, ``merge_func: sum``)

Hyper-parameters (defaults from FusionBench's ``config/method/opcm/ties_merging.yaml``): ``scaling``
λ = 0.5; ``density`` = 0.2 (its ``threshold: 20``, percent kept); ``trim_scope`` ``"global"``
(FusionBench flattens the whole model into one vector and trims it as a whole) or ``"tensor"``
(top-k within each tensor, as :mod:`fedmerge.aggregators.ties`). Entries tied in magnitude with the
k-th largest are all kept (FusionBench keeps |x| ≥ its threshold too, with k one larger).

The merged vector feeds back into every later step, so its mass compounds (a disjoint sum, not a
mean): the method is order-sensitive and drifts, which the paper reports (49.0 ± 10.2 on ViT-B/32).
State: τ⁽ᵗ⁻¹⁾, O(P); one merge holds two trimmed copies transiently.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import check_fraction
from fedmerge.aggregators.continual.base import ContinualMerger, check_finite_number, register_continual
from fedmerge.aggregators.kernels import topk_threshold
from fedmerge.aggregators.sparsify import keep_count
from fedmerge.errors import ConfigError

TRIM_SCOPES = ("global", "tensor")


def magnitude_threshold(tensors: list[torch.Tensor], density: float) -> float:
    """The k-th largest |x| over all ``tensors`` together, k = ⌊density · total size⌋."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    thr, _ = topk_threshold(flat, keep_count(flat.numel(), density))
    return thr


def trim_all(tv: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Zero all but the largest-magnitude entries (globally or per tensor); ties at the threshold kept."""
    if density >= 1.0:
        return dict(tv)
    zero = torch.zeros(())
    if scope == "global":
        thr = magnitude_threshold(list(tv.values()), density)
        return {k: torch.where(v.abs() >= thr, v, zero) for k, v in tv.items()}
    out = {}
    for k, v in tv.items():
        thr, _ = topk_threshold(v, keep_count(v.numel(), density))
        out[k] = torch.where(v.abs() >= thr, v, zero)
    return out


def ties_pair(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], density: float, scope: str
) -> dict[str, torch.Tensor]:
    """TIES of two task vectors with a disjoint sum (module docstring)."""
    ta, tb = trim_all(a, density, scope), trim_all(b, density, scope)
    signs = {k: torch.sign(ta[k] + tb[k]) for k in ta}
    majority = torch.sign(sum((s.sum() for s in signs.values()), torch.zeros(())))
    out = {}
    for k, s in signs.items():
        gamma = torch.where(s == 0, majority, s)
        keep_a = torch.where(gamma > 0, ta[k] > 0, ta[k] < 0)
        keep_b = torch.where(gamma > 0, tb[k] > 0, tb[k] < 0)
        out[k] = ta[k] * keep_a + tb[k] * keep_b
    return out


@register_continual
class ContinualTies(ContinualMerger):
    name: ClassVar[str] = "continual_ties"
    slots: ClassVar[tuple[str, ...]] = ("merged",)

    def __init__(
        self,
        *,
        scaling: float = 0.5,
        density: float = 0.2,
        trim_scope: str = "global",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device=device)
        self.scaling = check_finite_number("scaling", scaling)
        self.density = check_fraction("density", density, open_low=True)
        if trim_scope not in TRIM_SCOPES:
            raise ConfigError(f"trim_scope must be one of {TRIM_SCOPES}, got {trim_scope!r}")
        self.trim_scope = trim_scope

    @property
    def params(self) -> dict[str, Any]:
        return {"scaling": self.scaling, "density": self.density, "trim_scope": self.trim_scope}

    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        merged = self._slots["merged"]
        if not merged:
            self._slots["merged"] = {k: v * self.scaling for k, v in tau.items()}
            return
        update = ties_pair(merged, tau, self.density, self.trim_scope)
        for k, u in update.items():
            merged[k].add_(u, alpha=self.scaling)

    def _merged(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._slots["merged"].items()}
