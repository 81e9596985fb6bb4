"""DARE-TIES (Yu et al. 2024, DARE, combined with TIES' sign election).

    τ̃_i = m_i ⊙ τ_i / density,  m_i ~ Bernoulli(density)        (DARE drop and rescale)
    γ = sgn(Σ_i v_i τ̃_i);  τ = λ · Σ_{i: sgn(τ̃_i)=γ} w_i τ̃_i / D  (TIES elect + disjoint mean)

The defaults are peft's ``dare_ties`` (1/density rescale, unweighted vote, D = |A|), which follows
the papers. mergekit's ``dare_ties`` (a6e4028 / v0.1.4) differs in four defaults, all available as
options and gathered in :data:`fedmerge.aggregators.mergekit.MERGEKIT_DEFAULTS` ``["dare_ties"]``:
``rescale: true`` is an L1 norm-matching rescale (``rescale="l1"``), not 1/density;
``normalize: false`` sums the agreeing values (D = 1); the vote is on the weighted deltas
(``vote_weighting="weighted"``) and a normalised merge divides by the agreeing weights
(``divisor="weight"``); its density defaults to 1. Its mask is ``torch.bernoulli`` on the global
RNG (``mask_rng="torch"`` with a generator reproduces it). Options as in
:mod:`fedmerge.aggregators.ties` (sign_election, vote_weighting, divisor, normalize, int8_mask) and
:mod:`fedmerge.aggregators.sparsify` (rescale). Streams in O(P).
"""

from __future__ import annotations

from typing import ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.gta import Dare, GeneralizedTaskArithmetic
from fedmerge.aggregators.ties import SignConsensusAggregator


@register
class DareTies(GeneralizedTaskArithmetic, SignConsensusAggregator):
    """DARE's drop (:class:`~fedmerge.aggregators.gta.Dare`), then TIES' sign election and mean."""

    name: ClassVar[str] = "dare_ties"
    stochastic: ClassVar[bool] = True
    averaging: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, object]] = {"density": 1.0, "divisor": "weight"}
    round_defaults: ClassVar[dict[str, object]] = {"divisor": "weight"}  # a weighted disjoint mean
    sparsification = Dare
