"""DELLA (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"), with the drop step defined as mergekit's ``della_magprune``.

    p_i = (density − ε) + 2ε · r_i,  r_i = row-wise magnitude rank of τ_i normalised to [0, 1]
    τ̃_i = m_i ⊙ τ_i / p_i,  m_i ~ Bernoulli(p_i)                          (MAGPRUNE)
    τ = λ · Σ_{i: sgn(τ̃_i)=γ} w_i τ̃_i / D,  γ = sgn(Σ v_i τ̃_i)           (elect + fuse, as TIES)

density ± ε must lie in (0, 1). Ranking needs the whole tensor, so DELLA densifies sparse inputs.
Streams in O(P).

Defaults follow the paper (kept entries rescaled by 1/p_i, ε = 0.1). mergekit's ``della``
(a6e4028 / v0.1.4) has no 1/p rescale: its ``rescale: true`` (default) is the L1 norm-matching
rescale (``rescale="l1"``), ``rescale: false`` keeps raw masked values (``"none"``); its ε defaults to
0.15, density to 1, its vote and divisor are weighted and ``normalize`` is true:
:data:`fedmerge.aggregators.mergekit.MERGEKIT_DEFAULTS` ``["della"]``. ``della_linear`` is the
same drop without the sign election.
"""

from __future__ import annotations

from typing import ClassVar

from fedmerge.aggregators.base import register
from fedmerge.aggregators.gta import GeneralizedTaskArithmetic, MagPrune
from fedmerge.aggregators.ties import SignConsensusAggregator


@register
class Della(GeneralizedTaskArithmetic, SignConsensusAggregator):
    """MAGPRUNE (:class:`~fedmerge.aggregators.gta.MagPrune`: density, epsilon, rescale, mask_rng),
    then TIES' sign election and mean."""

    name: ClassVar[str] = "della"
    stochastic: ClassVar[bool] = True
    round_defaults: ClassVar[dict[str, object]] = {"divisor": "weight"}  # a weighted disjoint mean
    sparsification = MagPrune
