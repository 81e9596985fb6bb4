"""SLERP: spherical linear interpolation of two models (Shoemake 1985, "Animating Rotation with
Quaternion Curves"), per tensor, as mergekit's ``slerp``.

    u_k = x_k / ‖x_k‖ (left as is when ‖x_k‖ ≤ eps),  d = ⟨u_0, u_1⟩,  Ω = arccos d
    slerp(t; x_0, x_1) = sin((1−t)Ω)/sin Ω · x_0 + sin(tΩ)/sin Ω · x_1
    |d| > 1 − ε  (mergekit's DOT_THRESHOLD 0.9995, ε = ``1 − dot_threshold``):  (1−t)·x_0 + t·x_1

``t`` is one number or a mapping tensor name → t (every tensor named), each in [0, 1]; t = 0 gives
x_0. The endpoints are ordered by client id (integers before strings, then by value), so x_0 is
the model added with the smaller id (``merge("slerp", [a, b])``: a) whatever the arrival order;
mergekit's x_0 is its ``base_model``. One model alone is returned unchanged (as mergekit).

The tensors are interpolated as given. fedmerge merges deltas τ = θ − θ_base: to reproduce mergekit
on weights, feed the two models' weights (the recipe path does), or deltas of both models against a
common base and add that base back: slerp is not translation-invariant, so slerp of deltas is a
different (also meaningful) merge. Exactly two models (``exact_models = 2``): a third ``add`` is
refused. Not streaming in the registry's sense: it buffers both inputs, O(2·P), fp32; computed
in fp32 like mergekit (which computes in numpy fp32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import check_fraction, register
from fedmerge.aggregators.robust import PairAggregator
from fedmerge.errors import ConfigError


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's ``slerp`` on two fp32 tensors (same shape)."""
    a, b = v0.float(), v1.float()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta0 = math.acos(max(-1.0, min(1.0, dot)))
    sin0 = math.sin(theta0)
    thetat = theta0 * t
    s0 = math.sin(theta0 - thetat) / sin0
    s1 = math.sin(thetat) / sin0
    return s0 * a + s1 * b


@register
class Slerp(PairAggregator):
    name: ClassVar[str] = "slerp"
    averaging: ClassVar[bool] = True  # two identical models: d = 1 → lerp → the model

    def __init__(
        self,
        *,
        t: float | Mapping[str, float] = 0.5,
        dot_threshold: float = 0.9995,
        eps: float = 1e-8,
        **common: object,
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if isinstance(t, Mapping):
            self.t: float | dict[str, float] = {str(k): check_fraction(f"t[{k!r}]", v) for k, v in t.items()}
        else:
            self.t = check_fraction("t", t)
        self.dot_threshold = check_fraction("dot_threshold", dot_threshold)
        self.eps = float(eps)

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "t": self.t, "dot_threshold": self.dot_threshold, "eps": self.eps}

    def begin(self, reference_shapes: Mapping[str, Sequence[int]]) -> None:
        if isinstance(self.t, dict):
            missing = sorted(set(reference_shapes) - set(self.t))
            if missing:
                raise ConfigError(f"slerp: t names no value for tensors {missing}")
        super().begin(reference_shapes)

    def _t(self, key: str) -> float:
        return self.t[key] if isinstance(self.t, dict) else self.t

    def _merge_pair(
        self, key: str, shape: tuple[int, ...], i0: int, i1: int, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        return slerp(self._t(key), first, second, self.dot_threshold, self.eps)
