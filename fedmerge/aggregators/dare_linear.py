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

import torch

from fedmerge.aggregators.base import DeltaTensor, Prepared, check_fraction, register
from fedmerge.aggregators.linear import LinearAggregator
from fedmerge.aggregators.sparsify import check_mask_rng, check_rescale, dare_drop


@register
class DareLinear(LinearAggregator):
    name: ClassVar[str] = "dare_linear"
    stochastic: ClassVar[bool] = True

    def __init__(
        self,
        *,
        density: float = 0.5,
        rescale: str | bool = "inverse",
        mask_rng: str = "splitmix64",
        scaling: float = 1.0,
        normalize: bool = False,
        **common: object,
    ) -> None:
        super().__init__(scaling=scaling, normalize=normalize, **common)
        self.density = check_fraction("density", density, open_low=True)
        self.rescale = check_rescale(rescale)
        self.mask_rng = check_mask_rng(mask_rng)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "density": self.density, "rescale": self.rescale, "mask_rng": self.mask_rng}

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        return Prepared(dare_drop(x, self.density, generator, self.rescale, self.mask_rng))
