"""DARE-linear (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch").

    m_i ~ Bernoulli(density) per entry,  τ̃_i = m_i ⊙ τ_i / density      (drop rate p = 1 − density)
    τ = λ · Σ_i w_i τ̃_i          (÷ Σ w_i with ``normalize=True``)

The mask of client i and tensor k comes from a generator derived from (seed, round, i, k).
``rescale="l1"`` (or mergekit's ``rescale=True``) gives mergekit's norm-matching rescale instead of
1/density. mergekit's ``dare_linear`` defaults (a6e4028 / v0.1.4: density 1, ``rescale: true`` = L1,
``normalize: false``, torch.bernoulli masks) are
:data:`fedmerge.aggregators.mergekit.MERGEKIT_DEFAULTS` ``["dare_linear"]``; its ``lambda`` is
``scaling``. One difference: with ``normalize=True`` and weights summing to 0, mergekit divides by 1,
fedmerge refuses. Streams in O(P).
"""

from __future__ import annotations

from typing import ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.gta import Dare, GeneralizedTaskArithmetic
from fedmerge.aggregators.linear import LinearAggregator


@register
class DareLinear(GeneralizedTaskArithmetic, LinearAggregator):
    """DARE's drop (:class:`~fedmerge.aggregators.gta.Dare`: density, rescale, mask_rng), then a
    weighted sum (scaling, normalize)."""

    name: ClassVar[str] = "dare_linear"
    stochastic: ClassVar[bool] = True
    sparsification = Dare
