"""Generalized task arithmetic: the DARE / DELLA / breadcrumbs family declared once, as mergekit
composes its ``GeneralizedTaskArithmeticMerge`` (a sparsification of each task vector, an optional
sign consensus, a weighted sum).

    τ̃_i = S(τ_i; θ_S)                          sparsification S with its parameter block θ_S
    τ   = λ · Σ_i w_i τ̃_i  (÷ Σ w_i, normalize)  without consensus          (``*_linear``, breadcrumbs)
    τ   = λ · Σ_{i: sgn(τ̃_i)=γ} w_i τ̃_i / D      TIES' sign election γ      (``dare_ties``, della …)

A method is one line of composition: its :class:`Sparsification` (the parameter block: names,
defaults, validation, the drop itself) and its consensus (the base class:
:class:`~fedmerge.aggregators.linear.LinearAggregator` or
:class:`~fedmerge.aggregators.ties.SignConsensusAggregator`). The blocks:

- :class:`Dare` (Yu et al. 2024): m ~ Bernoulli(density), τ̃ = m ⊙ τ / density (``rescale``);
- :class:`MagPrune` (DELLA, Deep et al. 2024): p = (density − ε) + 2ε·rank, τ̃ = m ⊙ τ / p;
- :class:`BreadcrumbsPrune` (Davari & Belilovsky 2023): drop the γ largest and the smallest
  magnitudes, keep ``density`` of the entries (deterministic; optional L1 rescale).

Each method module (``dare_linear.py`` …) states its formula, paper and mergekit differences.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import DeltaTensor, Prepared, check_fraction, dense_of
from fedmerge.aggregators.sparsify import (
    check_keep_rounding,
    check_mask_rng,
    check_rescale,
    dare_drop,
    della_drop,
    magnitude_outliers,
)
from fedmerge.errors import ConfigError


@dataclass(frozen=True)
class Sparsification(ABC):
    """A parameter block and the per-client drop it defines. ``checks`` validates (and normalises)
    each field in declaration order on construction; :meth:`_check_together` what spans fields."""

    checks: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, self.checks[f.name](getattr(self, f.name)))
        self._check_together()

    def _check_together(self) -> None:  # noqa: B027 (optional hook, none by default)
        """Checks over several fields (none by default)."""

    @abstractmethod
    def apply(self, x: DeltaTensor, generator: torch.Generator) -> DeltaTensor:
        """τ̃ = S(τ) for one tensor of one client."""


def _fraction(name: str, *, open_low: bool = False) -> Callable[[Any], float]:
    return lambda value: check_fraction(name, value, open_low=open_low)


def _deterministic_rescale(value: str | bool) -> str:
    rescale = check_rescale(value)
    if rescale == "inverse":
        raise ConfigError("breadcrumbs' mask is deterministic: rescale must be 'l1' or 'none' (or a bool)")
    return rescale


@dataclass(frozen=True)
class Dare(Sparsification):
    """DARE: m ~ Bernoulli(density), τ̃ = m ⊙ τ / density (or mergekit's L1 rescale)."""

    density: float = 0.5
    rescale: str | bool = "inverse"
    mask_rng: str = "splitmix64"
    checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "density": _fraction("density", open_low=True), "rescale": check_rescale, "mask_rng": check_mask_rng,
    }  # fmt: skip

    def apply(self, x: DeltaTensor, generator: torch.Generator) -> DeltaTensor:
        return dare_drop(x, self.density, generator, str(self.rescale), self.mask_rng)


@dataclass(frozen=True)
class MagPrune(Sparsification):
    """DELLA's MAGPRUNE: p = (density − ε) + 2ε·rank, m ~ Bernoulli(p), τ̃ = m ⊙ τ / p."""

    density: float = 0.5
    epsilon: float = 0.1
    rescale: str | bool = "inverse"
    mask_rng: str = "splitmix64"
    checks: ClassVar[dict[str, Callable[[Any], Any]]] = {**Dare.checks, "epsilon": _fraction("epsilon")}

    def _check_together(self) -> None:
        if self.density < 1.0 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ConfigError(
                f"DELLA needs density ± epsilon inside (0, 1); got density={self.density}, "
                f"epsilon={self.epsilon}"
            )

    def apply(self, x: DeltaTensor, generator: torch.Generator) -> DeltaTensor:
        return della_drop(
            dense_of(x), self.density, self.epsilon, generator, str(self.rescale), self.mask_rng
        )


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


@dataclass(frozen=True)
class BreadcrumbsPrune(Sparsification):
    """Breadcrumbs: keep ``density`` of the entries between the γ outliers and the smallest ones."""

    density: float = 0.1
    gamma: float = 0.01
    rescale: str | bool = "none"
    keep_rounding: str = "floor"
    checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "density": _fraction("density"), "gamma": _fraction("gamma"),
        "rescale": _deterministic_rescale, "keep_rounding": check_keep_rounding,
    }  # fmt: skip

    def apply(self, x: DeltaTensor, generator: torch.Generator) -> DeltaTensor:
        if self.density >= 1.0:
            return x
        return breadcrumbs_mask(dense_of(x), self.density, self.gamma, str(self.rescale), self.keep_rounding)


class GeneralizedTaskArithmetic:
    """Mixin placed before the consensus base class: takes the parameters of ``sparsification`` (its
    fields, listed in ``declared_params`` for the registry's parameter check), hands the rest to the
    base class, and sparsifies each client tensor in ``_prepare``."""

    sparsification: ClassVar[type[Sparsification]]
    declared_params: ClassVar[tuple[str, ...]] = ()
    sparsifier: Sparsification

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "sparsification" in cls.__dict__:
            cls.declared_params = tuple(f.name for f in fields(cls.sparsification))

    def __init__(self, **params: Any) -> None:
        own = {name: params.pop(name) for name in self.declared_params if name in params}
        super().__init__(**params)
        self.sparsifier = self.sparsification(**own)

    def __getattr__(self, name: str) -> Any:  # the block's values as attributes (agg.density …)
        if name != "sparsifier" and name in type(self).declared_params:
            return getattr(self.sparsifier, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, **asdict(self.sparsifier)}  # type: ignore[misc]

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        return Prepared(self.sparsifier.apply(x, generator))
