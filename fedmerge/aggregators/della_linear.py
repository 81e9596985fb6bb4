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

import torch

from fedmerge.aggregators.base import DeltaTensor, Prepared, check_fraction, dense_of, register
from fedmerge.aggregators.linear import LinearAggregator
from fedmerge.aggregators.sparsify import check_mask_rng, check_rescale, della_drop
from fedmerge.errors import ConfigError


@register
class DellaLinear(LinearAggregator):
    name: ClassVar[str] = "della_linear"
    stochastic: ClassVar[bool] = True

    def __init__(
        self,
        *,
        density: float = 0.5,
        epsilon: float = 0.1,
        rescale: str | bool = "inverse",
        mask_rng: str = "splitmix64",
        scaling: float = 1.0,
        normalize: bool = False,
        **common: object,
    ) -> None:
        super().__init__(scaling=scaling, normalize=normalize, **common)
        self.density = check_fraction("density", density, open_low=True)
        self.epsilon = check_fraction("epsilon", epsilon)
        if self.density < 1.0 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ConfigError(
                f"DELLA needs density ± epsilon inside (0, 1); got density={density}, epsilon={epsilon}"
            )
        self.rescale = check_rescale(rescale)
        self.mask_rng = check_mask_rng(mask_rng)

    @property
    def params(self) -> dict[str, object]:
        return {
            **super().params,
            "density": self.density,
            "epsilon": self.epsilon,
            "rescale": self.rescale,
            "mask_rng": self.mask_rng,
        }

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        return Prepared(
            della_drop(dense_of(x), self.density, self.epsilon, generator, self.rescale, self.mask_rng)
        )
