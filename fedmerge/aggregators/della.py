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

import torch

from fedmerge.aggregators.base import DeltaTensor, Prepared, check_fraction, dense_of, register
from fedmerge.aggregators.sparsify import check_mask_rng, check_rescale, della_drop
from fedmerge.aggregators.ties import SignConsensusAggregator
from fedmerge.errors import ConfigError


class MagPrune:
    """DELLA's per-client step (MAGPRUNE, module docstring), shared by ``della`` and ``della_linear``:
    validates and records ``density``, ``epsilon``, ``rescale``, ``mask_rng`` and drops in ``_prepare``."""

    density: float
    epsilon: float
    rescale: str
    mask_rng: str

    def _init_magprune(self, density: float, epsilon: float, rescale: str | bool, mask_rng: str) -> None:
        self.density = check_fraction("density", density, open_low=True)
        self.epsilon = check_fraction("epsilon", epsilon)
        if self.density < 1.0 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ConfigError(
                f"DELLA needs density ± epsilon inside (0, 1); got density={density}, epsilon={epsilon}"
            )
        self.rescale = check_rescale(rescale)
        self.mask_rng = check_mask_rng(mask_rng)

    def _magprune_params(self) -> dict[str, object]:
        return {"density": self.density, "epsilon": self.epsilon, "rescale": self.rescale,
                "mask_rng": self.mask_rng}  # fmt: skip

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        return Prepared(
            della_drop(dense_of(x), self.density, self.epsilon, generator, self.rescale, self.mask_rng)
        )


@register
class Della(MagPrune, SignConsensusAggregator):
    name: ClassVar[str] = "della"
    stochastic: ClassVar[bool] = True
    round_defaults: ClassVar[dict[str, object]] = {"divisor": "weight"}  # a weighted disjoint mean

    def __init__(
        self,
        *,
        density: float = 0.5,
        epsilon: float = 0.1,
        rescale: str | bool = "inverse",
        mask_rng: str = "splitmix64",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._init_magprune(density, epsilon, rescale, mask_rng)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, **self._magprune_params()}
