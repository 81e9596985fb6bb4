"""RAM: Reinforced Agent Merging (arXiv 2601.13572; mergekit 0.1.5's ``ram`` and ``ramplus_tl``), per
tensor over the task vectors τ_i = θ_i − θ_base.

A coordinate j *contributes* in model i when |τ_{i,j}| > ε; c_j = #{i : |τ_{i,j}| > ε}. Coordinates
only one model changed are kept whole; shared ones are averaged over the models that changed them:

    ram:          τ'_j = Σ_i [|τ_{i,j}| > ε] · τ_{i,j} · (1 if c_j = 1 else 1 / c_j)
    ramplus_tl:   the unique part of model i is amplified by λ_i = 1 + r · clamp(ρ_i, 0, α),
                  ρ_i = #{j : i contributes, c_j > 1} / max(#{j : i contributes, c_j = 1}, ε)
                  (tensor-local: the counts are over this tensor's coordinates)

Defaults as mergekit: ε = 1e-5, r = 0.1, α = 0.2. The per-model ``weight`` is not used. Not
streaming: the counts c_j need every task vector of the tensor (N × P).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import register
from fedmerge.aggregators.robust import BufferingAggregator
from fedmerge.errors import ConfigError


def _finite_nonneg(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number ≥ 0, got {v!r}")
    return float(v)


def ram(
    tvs: torch.Tensor, epsilon: float = 1e-5, *, r: float | None = None, alpha: float = 0.2
) -> torch.Tensor:
    """RAM (``r=None``) or RAM+ tensor-local (``r`` given) of stacked task vectors (N, P), fp32."""
    x = tvs.float().reshape(tvs.shape[0], -1)
    nonzero = x.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    xz = x * nonzero
    shared = xz * overlap / counts.clamp(min=1)
    if r is None:
        return (xz * unique + shared).sum(dim=0)
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return (xz * unique * lam.unsqueeze(-1) + shared).sum(dim=0)


@register
class RAM(BufferingAggregator):
    name: ClassVar[str] = "ram"
    averaging: ClassVar[bool] = True  # identical τ: shared coordinates averaged over N copies → τ

    def __init__(self, *, epsilon: float = 1e-5, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.epsilon = _finite_nonneg("ram: epsilon", epsilon)

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "epsilon": self.epsilon}

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return ram(stacked, self.epsilon)


@register
class RAMPlusTL(BufferingAggregator):
    name: ClassVar[str] = "ramplus_tl"
    averaging: ClassVar[bool] = False  # one model alone: its unique part is amplified by λ

    def __init__(
        self, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5, **common: object
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.r = _finite_nonneg("ramplus_tl: r", r)
        self.alpha = _finite_nonneg("ramplus_tl: alpha", alpha)
        self.epsilon = _finite_nonneg("ramplus_tl: epsilon", epsilon)

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "r": self.r, "alpha": self.alpha, "epsilon": self.epsilon}

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return ram(stacked, self.epsilon, r=self.r, alpha=self.alpha)
