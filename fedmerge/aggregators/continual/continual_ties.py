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
Not a batch TIES plus state (:mod:`fedmerge.aggregators.ties` merges all experts at once with a
disjoint *mean*; this merges the running result with one expert, with a disjoint *sum*), so it keeps
its own class; the trim thresholds (:mod:`fedmerge.aggregators.sparsify`) and the fused trim, vote
and sign split (:mod:`fedmerge.aggregators.kernels`) are the batch methods'.
State: τ⁽ᵗ⁻¹⁾, O(P); one merge holds three model-sized fold accumulators transiently.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import check_fraction
from fedmerge.aggregators.continual.base import ContinualMerger, check_finite_number, register_continual
from fedmerge.aggregators.kernels import VOTE_TOTAL, sign_split_dense, zeros
from fedmerge.aggregators.sparsify import magnitude_threshold, trim_at
from fedmerge.errors import ConfigError

TRIM_SCOPES = ("global", "tensor")
KEEP_TIES = 2**62  # tie cut of the fused trim: entries tied with the threshold are all kept


def trim_thresholds(tv: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, float]:
    """Per tensor, the magnitude below which :func:`trim_all` zeroes (0: nothing is trimmed)."""
    if density >= 1.0:
        return {k: 0.0 for k in tv}
    if scope == "global":
        thr = magnitude_threshold(list(tv.values()), density)
        return {k: thr for k in tv}
    return {k: magnitude_threshold([v], density) for k, v in tv.items()}


def trim_all(tv: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Zero all but the largest-magnitude entries (globally or per tensor); ties at the threshold kept."""
    if density >= 1.0:
        return dict(tv)
    return {k: trim_at(tv[k], t) for k, t in trim_thresholds(tv, density, scope).items()}


def ties_pair(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], density: float, scope: str
) -> dict[str, torch.Tensor]:
    """TIES of two task vectors with a disjoint sum (module docstring).

    The trim, the vote S = â + b̂ and the sign split P = Σ max(x̂, 0), N = Σ min(x̂, 0) are one fold of
    the batch TIES kernel (:func:`~fedmerge.aggregators.kernels.sign_split_dense`, unit votes and
    weights, the trim fused as a threshold that keeps ties); the disjoint sum is then P where γ > 0
    and N elsewhere (γ = 0 only when the global majority is 0 too, where FusionBench keeps N).
    """
    thr_a, thr_b = trim_thresholds(a, density, scope), trim_thresholds(b, density, scope)
    split: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for k in a:
        acc = [zeros(a[k].numel(), a[k].device) for _ in range(5)]  # S, P, N, Pc, Nc
        sign_split_dense(
            [a[k], b[k]],
            [thr_a[k], thr_b[k]],
            [KEEP_TIES] * 2,
            (1.0, 1.0),
            (1.0, 1.0),
            (1.0, 1.0),
            VOTE_TOTAL,
            acc,
        )
        split[k] = (torch.sign(acc[0]), acc[1], acc[2])
    majority = torch.sign(sum((s.sum() for s, _, _ in split.values()), torch.zeros(())))
    out = {}
    for k, (s, pos, neg) in split.items():
        gamma = torch.where(s == 0, majority, s)
        out[k] = torch.where(gamma > 0, pos, neg).reshape(a[k].shape)
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
