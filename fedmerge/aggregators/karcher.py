"""Karcher mean: the weighted Riemannian (Fréchet) mean of N tensors' directions on the unit sphere,
scaled by their weighted mean norm (Karcher 1977; mergekit's ``karcher``, ``merge_methods/karcher.py``
at arcee-ai/mergekit a6e4028).

Per tensor (flattened), with ŵ_i = w_i / Σ w and x_i the inputs:

    u_i = x_i / ‖x_i‖ for the inputs with ‖x_i‖ > tol, their weights renormalised to a_i = ŵ_i / Σ_valid ŵ
    u   = Σ a_i u_i / ‖Σ a_i u_i‖        (u_0 of the valid inputs if that norm is < tol)
    repeat max_iter times (Riemannian gradient descent with unit step, the exponential map of the sphere):
        θ_i = arccos(clamp(⟨u, u_i⟩, −1, 1));   T = Σ_{θ_i ≥ tol} a_i · θ_i / sin θ_i · (u_i − ⟨u, u_i⟩ u)
        stop if ‖T‖ < tol;   u ← cos‖T‖ · u + sin‖T‖ · T / ‖T‖;   u ← u / ‖u‖
    τ = (Σ_i ŵ_i ‖x_i‖) · u · scaling

T is the Riemannian gradient of ½ Σ a_i d(u, u_i)² (d the geodesic distance) taken with a minus sign,
so the fixed point is the Karcher mean; ``tol`` is both the norm threshold, the angle below which an
input no longer pulls, and the stopping threshold on ‖T‖ — all three as mergekit. Every input with
norm 0 (or ≤ tol) still counts in the scale with its weight. All inputs 0: 0.

mergekit merges the weights θ_i with equal weights 1/N and ignores a per-model ``weight``; here the
client weights make it a weighted mean (equal weights reproduce mergekit). fedmerge's inputs are
deltas: merge task vectors, or pass full weights (a recipe's ``merge_method: karcher`` does, through
:data:`fedmerge.aggregators.mergekit.METHODS`). Defaults: ``max_iter`` = 10, ``tol`` = 1e-5 (mergekit's).

Not streaming: each iteration needs ⟨u, u_i⟩ for the current u and every i, so the inputs cannot be
folded into a fixed-size sum in one pass. Every delta is buffered as a dense fp32 tensor until
``finalize`` (memory O(N·P); the per-tensor work is O(max_iter · N · P)).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import register
from fedmerge.aggregators.iso import _TaskBuffer
from fedmerge.errors import ConfigError


def karcher_mean(
    xs: list[torch.Tensor], weights: list[float], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """The weighted Karcher mean of the module docstring for flat fp32 tensors ``xs`` (weights ŵ
    normalised here; their sum must be > 0)."""
    total = sum(weights)
    alphas = [w / total for w in weights]
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a_sum = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / a_sum for i in valid], dtype=torch.float32, device=xs[0].device)
    units = torch.stack([xs[i] / norms[i] for i in valid])  # (n_valid, P)
    u = (a[:, None] * units).sum(0)
    norm_u = float(torch.linalg.vector_norm(u))
    u = units[0].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        dots = torch.clamp(units @ u, -1.0, 1.0)
        theta = torch.arccos(dots)
        pull = theta >= tol
        coef = torch.where(pull, a * theta / torch.where(pull, torch.sin(theta), 1.0), 0.0)
        t = coef @ units - (coef * dots).sum() * u  # Σ a_i θ_i/sin θ_i (u_i − ⟨u, u_i⟩ u)
        norm_t = torch.linalg.vector_norm(t)
        if float(norm_t) < tol:
            break
        u = torch.cos(norm_t) * u + torch.sin(norm_t) * (t / norm_t)
        u_norm = float(torch.linalg.vector_norm(u))
        if u_norm > tol:
            u = u / u_norm
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return u * scale


@register
class Karcher(_TaskBuffer):
    name: ClassVar[str] = "karcher"
    averaging: ClassVar[bool] = True

    def __init__(
        self, *, max_iter: int = 10, tol: float = 1e-5, scaling: float = 1.0, **common: object
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or int(max_iter) < 1:
            raise ConfigError(f"karcher: max_iter must be an integer ≥ 1, got {max_iter!r}")
        if not 0.0 <= float(tol) < 1.0:
            raise ConfigError(f"karcher: tol must be in [0, 1), got {tol!r}")
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.scaling = float(scaling)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "max_iter": self.max_iter, "tol": self.tol, "scaling": self.scaling}

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        self._require_weight()
        tasks = self._tasks.pop(key)
        xs, ws = [x for x, _ in tasks], [w for _, w in tasks]
        return karcher_mean(xs, ws, max_iter=self.max_iter, tol=self.tol) * self.scaling
