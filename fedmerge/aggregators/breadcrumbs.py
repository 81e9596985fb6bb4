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

from fedmerge.aggregators.base import register
from fedmerge.aggregators.gta import BreadcrumbsPrune, GeneralizedTaskArithmetic
from fedmerge.aggregators.linear import LinearAggregator
from fedmerge.aggregators.ties import SignConsensusAggregator


@register
class Breadcrumbs(GeneralizedTaskArithmetic, LinearAggregator):
    """The breadcrumbs mask (:class:`~fedmerge.aggregators.gta.BreadcrumbsPrune`: density, gamma,
    rescale, keep_rounding), then a weighted sum."""

    name: ClassVar[str] = "breadcrumbs"
    averaging: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, object]] = {"density": 1.0, "normalize": True}
    sparsification = BreadcrumbsPrune


@register
class BreadcrumbsTies(GeneralizedTaskArithmetic, SignConsensusAggregator):
    """The breadcrumbs mask, then TIES' sign election and mean."""

    name: ClassVar[str] = "breadcrumbs_ties"
    averaging: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, object]] = {"density": 1.0, "divisor": "weight"}
    sparsification = BreadcrumbsPrune
