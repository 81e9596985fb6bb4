"""NuSLERP: SLERP of two models with weights, row-wise or flattened (mergekit 0.1.5's ``nuslerp``;
SLERP: Shoemake 1985, "Animating Rotation with Quaternion Curves").

    t = w_1 / (w_0 + w_1)            (0.5 when |w_0 + w_1| < 1e-6)
    u_k = x_k / max(‖x_k‖, 1e-7),  cos θ = clamp(⟨u_0, u_1⟩, −1, 1)
    nuslerp(t; x_0, x_1) = (sin((1−t)θ) x_0 + sin(tθ) x_1) / sin θ
    1 − cos²θ ≤ eps² (eps = 1e-8, colinear):  (1−t) x_0 + t x_1

over the whole tensor (``nuslerp_flatten`` = true, mergekit's default), or per row of the last axis
(``nuslerp_flatten`` = false), or per column (``nuslerp_row_wise`` = true: along axis 0). x_0 is the
model added with the smaller client id (the recipe's first model). With a base model mergekit
interpolates the task vectors and adds the base back: feed τ_i for that, θ_i without a base (the
recipe path does both). Exactly two models. Not streaming: both inputs are buffered (2 × P).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import register
from fedmerge.aggregators.robust import PairAggregator


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's ``nuslerp`` (fp32): along ``dim``, or over the flattened tensors."""
    shape = v0.shape
    a, b = v0.float(), v1.float()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    ua = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(ua * ub, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register
class NuSlerp(PairAggregator):
    name: ClassVar[str] = "nuslerp"

    def __init__(
        self, *, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True, **common: object
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.row_wise = bool(nuslerp_row_wise)
        self.flatten = bool(nuslerp_flatten)
        self._weights: list[float] = []

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "nuslerp_row_wise": self.row_wise, "nuslerp_flatten": self.flatten}

    def begin(self, reference_shapes: Mapping[str, Sequence[int]]) -> None:
        super().begin(reference_shapes)
        self._weights = []

    def _accepted(self, client_id: str | int, weight: float) -> None:
        super()._accepted(client_id, weight)
        self._weights.append(weight)

    def _merge_pair(
        self, key: str, shape: tuple[int, ...], i0: int, i1: int, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        total = self._weights[i0] + self._weights[i1]
        t = 0.5 if abs(total) < 1e-6 else self._weights[i1] / total
        return nuslerp(
            t,
            first.reshape(shape),
            second.reshape(shape),
            dim=0 if self.row_wise else -1,
            flatten=self.flatten,
        )
