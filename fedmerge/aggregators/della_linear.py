"""DELLA-linear (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"; mergekit's ``della_linear``): DELLA's MAGPRUNE drop without the sign
election.

    p_i = (density − ε) + 2ε · r_i,  r_i = row-wise magnitude rank of τ_i normalised to [0, 1]
    τ̃_i = m_i ⊙ τ_i / p_i,  m_i ~ Bernoulli(p_i)                   (MAGPRUNE, as della.py)
    τ = λ · Σ_i w_i τ̃_i        (÷ Σ w_i with ``normalize=True``)

Defaults as :mod:`fedmerge.aggregators.della` (the paper's 1/p rescale, ε = 0.1). mergekit
(a6e4028 / v0.1.4) rescales by L1 norm matching (``rescale: true`` = ``rescale="l1"``) instead of
1/p, defaults ε to 0.15 and density to 1, and does not normalise:
:data:`fedmerge.aggregators.mergekit.MERGEKIT_DEFAULTS` ``["della_linear"]``. Densifies sparse
inputs (ranking needs the whole tensor). Streams in O(P).
"""

from __future__ import annotations

from typing import ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.gta import GeneralizedTaskArithmetic, MagPrune
from fedmerge.aggregators.linear import LinearAggregator


@register
class DellaLinear(GeneralizedTaskArithmetic, LinearAggregator):
    """MAGPRUNE (:class:`~fedmerge.aggregators.gta.MagPrune`), then a weighted sum."""

    name: ClassVar[str] = "della_linear"
    stochastic: ClassVar[bool] = True
    sparsification = MagPrune
