"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks"), as mergekit's ``breadcrumbs`` and ``breadcrumbs_ties``.

    m_i = 1 on the entries of τ_i whose |·| rank lies between the n_bot smallest and the n_top largest,
          n_top = ⌊γ·n⌋,  n_bot = n − ⌊density·n⌋ − n_top      (outliers and small values dropped)
    τ̃_i = m_i ⊙ τ_i       (``rescale="l1"``: times ‖τ_i‖₁ / ‖τ̃_i‖₁, mergekit's ``rescale: true``)
    breadcrumbs:       τ = λ · Σ_i w_i τ̃_i        (÷ Σ w_i with ``normalize=True``)
    breadcrumbs_ties:  TIES' sign election and disjoint mean over the τ̃_i (see ties.py)

Defaults: γ = 0.01 (mergekit's default and the paper's order of magnitude for the outlier fraction)
and density = 0.1 (90 % of each task vector dropped); the paper tunes both per benchmark, so these
are a starting point, not its numbers. mergekit's own density default is 1, which disables the mask
altogether (:data:`fedmerge.aggregators.mergekit.MERGEKIT_DEFAULTS`). Known difference from
mergekit (a6e4028 / v0.1.4): when ⌊γ·n⌋ = 0 mergekit's slice ``indices[n_bot:-0]`` is empty and the
whole tensor is zeroed; here the ⌊density·n⌋ largest entries are kept
(:func:`fedmerge.aggregators.sparsify.magnitude_outliers`).

Ranking needs the whole tensor, so sparse inputs are densified. Streams in O(P) (breadcrumbs: one
accumulator; breadcrumbs_ties: TIES' five).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import DeltaTensor, Prepared, check_fraction, dense_of, register
from fedmerge.aggregators.linear import LinearAggregator
from fedmerge.aggregators.sparsify import check_keep_rounding, check_rescale, magnitude_outliers
from fedmerge.aggregators.ties import SignConsensusAggregator
from fedmerge.errors import ConfigError


def breadcrumbs_mask(
    x: torch.Tensor, density: float, gamma: float, rescale: str, rounding: str
) -> torch.Tensor:
    """τ̃ = magnitude_outliers(τ), optionally L1-rescaled (mergekit's eps 1e-7 guard)."""
    kept = magnitude_outliers(x, density, gamma, rounding).float()
    if rescale == "l1" and density < 1.0:
        before, after = x.float().abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept


class _BreadcrumbsParams:
    density: float
    gamma: float
    rescale: str
    keep_rounding: str

    def _init_breadcrumbs(
        self, density: float, gamma: float, rescale: str | bool, keep_rounding: str
    ) -> None:
        self.density = check_fraction("density", density)
        self.gamma = check_fraction("gamma", gamma)
        self.rescale = check_rescale(rescale)
        if self.rescale == "inverse":
            raise ConfigError(
                "breadcrumbs' mask is deterministic: rescale must be 'l1' or 'none' (or a bool)"
            )
        self.keep_rounding = check_keep_rounding(keep_rounding)

    def _breadcrumbs_params(self) -> dict[str, object]:
        return {
            "density": self.density,
            "gamma": self.gamma,
            "rescale": self.rescale,
            "keep_rounding": self.keep_rounding,
        }

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        if self.density >= 1.0:
            return Prepared(x)
        return Prepared(
            breadcrumbs_mask(dense_of(x), self.density, self.gamma, self.rescale, self.keep_rounding)
        )


@register
class Breadcrumbs(_BreadcrumbsParams, LinearAggregator):
    name: ClassVar[str] = "breadcrumbs"
    averaging: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, object]] = {"density": 1.0, "normalize": True}

    def __init__(
        self,
        *,
        density: float = 0.1,
        gamma: float = 0.01,
        rescale: str | bool = "none",
        keep_rounding: str = "floor",
        scaling: float = 1.0,
        normalize: bool = False,
        **common: object,
    ) -> None:
        super().__init__(scaling=scaling, normalize=normalize, **common)
        self._init_breadcrumbs(density, gamma, rescale, keep_rounding)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, **self._breadcrumbs_params()}


@register
class BreadcrumbsTies(_BreadcrumbsParams, SignConsensusAggregator):
    name: ClassVar[str] = "breadcrumbs_ties"
    averaging: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, object]] = {"density": 1.0, "divisor": "weight"}

    def __init__(
        self,
        *,
        density: float = 0.1,
        gamma: float = 0.01,
        rescale: str | bool = "none",
        keep_rounding: str = "floor",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._init_breadcrumbs(density, gamma, rescale, keep_rounding)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, **self._breadcrumbs_params()}
