"""OPCM: Orthogonal Projection-based Continual Merging.

Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging"; reference implementation FusionBench ``fusion_bench/method/opcm/opcm.py``
(``OPCMForCLIP``). With τ_t = θ_t − θ_0 and ‖·‖ the global L2 norm over all parameters::

    τ⁽¹⁾ = τ_1;  λ_1 = 1;  Σ‖τ‖ = ‖τ_1‖;  n = 1
    for each new expert t:
        n += 1;  Σ‖τ‖ += ‖τ_t‖;  ν = Σ‖τ‖ / n                  (target norm: mean task-vector norm)
        linear weight W:   U diag(s) Vᵀ = svd(τ⁽ᵗ⁻¹⁾[W])
                           r = first i with cumsum(s)_i / Σs > α
                           P = Uᵀ τ_t[W] V;  P_ii = 0 ∀i;  P[:r, :r] = 0
                           S[W] = λ_{t−1} τ⁽ᵗ⁻¹⁾[W] + U P Vᵀ
        other parameter:   S = λ_{t−1} τ⁽ᵗ⁻¹⁾ + τ_t
        λ_t = ‖S‖ / ν;  τ⁽ᵗ⁾ = S / λ_t

Hyper-parameters
    ``alpha`` (default 0.5, FusionBench's ``config/method/opcm/opcm.yaml``): the fraction of the
    singular-value mass of the merged task vector that is protected; in [0, 1).
    ``linear_weights``: the names of the parameters treated as linear weights. FusionBench projects
    exactly the ``weight`` of every ``nn.Linear`` module; embeddings (``nn.Embedding``, CLIP's
    position embedding), the patch-embedding convolution, LayerNorm and biases are "other
    parameters" and are simply added. :func:`linear_weight_names` reproduces that rule from a module.
    With ``linear_weights=None`` (a bare state dict, no module) every 2-D tensor whose name does not
    match ``exclude`` (default: names containing ``embed``, ``wte`` or ``wpe``) is a linear weight.

Economical SVD. FusionBench takes the full SVD (U m×m, V n×n). With the thin SVD
(U m×k, V n×k, k = min(m, n)) the product U P Vᵀ would silently drop the part of τ_t outside
span(U)×span(V) when m ≠ n. Every zeroed entry of P lies in its top-left k×k block, so we compute
the same matrix as ``τ_t − U (M ⊙ Uᵀ τ_t V) Vᵀ`` with the thin factors (M marks the zeroed
entries): identical to FusionBench's full-SVD result, without the m×m and n×n matrices.

Two degenerate cases FusionBench does not meet: a linear weight whose merged task vector is all
zeros has no subspace to protect, so τ_t is added unprojected (FusionBench would zero the diagonal
in whatever basis the SVD of the zero matrix returns); if ν = 0 or ‖S‖ = 0, λ_t = 1.
Overflow: every expert is bounded by :func:`~fedmerge.delta.rules.value_bound` (|x| ≤
sqrt(FP32_MAX / 4P), so ‖τ‖_F ≤ sqrt(FP32_MAX)/2), the norms are taken in fp64, the projection
coordinates satisfy |Uᵀ τ V|_ij ≤ ‖τ‖_F (U, V orthonormal) and ‖S‖ grows at most by ‖τ_t‖ per expert:
no fp32 product overflows for experts inside the bound. A 3e38-valued expert is refused by the bound
before it reaches the projection, and :meth:`ContinualMerger.add_expert` restores the state if a merge
is not finite anyway.
Differences of rounding only: norms are accumulated in fp64 (FusionBench: fp32), ν is Σ‖τ‖/n
(FusionBench: ``np.mean``) and the task vectors are never re-derived from θ − θ_0.

State: τ⁽ᵗ⁾ (one model-sized fp32 tensor), λ_t, Σ‖τ‖ and n: O(P) whatever the number of experts.
Cost of one merge: one thin SVD per m×n linear weight, O(mn·min(m, n)), plus O(P) elementwise work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fedmerge.aggregators.continual.base import ContinualMerger, check_finite_number, register_continual
from fedmerge.errors import ConfigError

DEFAULT_EXCLUDE = r"(?i)(embed|wte|wpe)"


def linear_weight_names(model: nn.Module) -> list[str]:
    """Names of the ``weight`` of every ``nn.Linear`` in ``model`` (FusionBench's "linear weights")."""
    return sorted(
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """r = first index i with cumsum(s)_i / Σ s > α (0 when none is, or when Σ s = 0), as FusionBench."""
    total = s.sum()
    if not bool(total > 0):
        return 0
    return int((s.cumsum(dim=0) / total > alpha).float().argmax().item())


def project_out(previous: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """The part of ``new`` OPCM keeps: its coordinates in the SVD basis of ``previous`` with the diagonal
    and the dominant r×r block zeroed (module docstring), computed with the thin SVD."""
    U, s, Vh = torch.linalg.svd(previous, full_matrices=False)
    if not bool(s.sum() > 0):
        return new.clone()
    r = split_rank(s, alpha)
    coords = U.T @ new @ Vh.T  # k×k: Uᵀ τ V
    removed = torch.diag_embed(coords.diagonal())
    removed[:r, :r] = coords[:r, :r]
    return new - U @ removed @ Vh


def global_norm_sq(tensors: Sequence[torch.Tensor]) -> float:
    """Σ ‖t‖² over tensors, accumulated in fp64."""
    total = 0.0
    for t in tensors:
        total += float(t.double().pow(2).sum())
    return total


@register_continual
class OPCM(ContinualMerger):
    name: ClassVar[str] = "opcm"
    slots: ClassVar[tuple[str, ...]] = ("merged",)
    scalars: ClassVar[tuple[str, ...]] = ("lambda", "norm_sum")

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        linear_weights: Sequence[str] | None = None,
        exclude: str = DEFAULT_EXCLUDE,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device=device)
        a = check_finite_number("alpha", alpha)
        if not 0.0 <= a < 1.0:
            raise ConfigError(
                f"alpha must be in [0, 1), got {alpha!r} (α ≥ 1 would protect nothing: r is always 0)"
            )
        self.alpha = a
        if isinstance(linear_weights, str):
            raise ConfigError("linear_weights must be a list of parameter names, not one string")
        self.linear_weights = None if linear_weights is None else sorted(set(linear_weights))
        try:
            self._exclude = re.compile(exclude)
        except re.error as e:
            raise ConfigError(f"exclude must be a regular expression, got {exclude!r}: {e}") from None
        self.exclude = exclude

    @property
    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "linear_weights": self.linear_weights, "exclude": self.exclude}

    @property
    def lambda_t(self) -> float:
        """λ_t, the factor the last merge divided by (1 after the first expert)."""
        return self._scalars["lambda"]

    def is_linear(self, name: str, shape: Sequence[int]) -> bool:
        """Whether ``name`` is projected (a linear weight) or simply added."""
        if self.linear_weights is not None:
            return name in self.linear_weights
        return len(shape) == 2 and self._exclude.search(name) is None

    def _check_linear_names(self, tau: dict[str, torch.Tensor]) -> None:
        for name in self.linear_weights or []:
            if name not in tau:
                raise ConfigError(
                    f"opcm: linear weight {name!r} is not in the task vector; fix linear_weights "
                    f"(the task vector has e.g. {sorted(tau)[:5]})"
                )
            if tau[name].dim() != 2:
                raise ConfigError(
                    f"opcm: linear weight {name!r} has shape {tuple(tau[name].shape)}; only 2-D tensors "
                    "can be projected, remove it from linear_weights"
                )

    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        norm = global_norm_sq(list(tau.values())) ** 0.5
        merged = self._slots["merged"]
        if self._num_merged == 0:
            self._check_linear_names(tau)
            self._slots["merged"] = {k: v.clone() for k, v in tau.items()}
            self._scalars["lambda"] = 1.0
            self._scalars["norm_sum"] = norm
            return
        n = self._num_merged + 1
        norm_sum = self._scalars["norm_sum"] + norm
        target = norm_sum / n  # ν
        prev_lambda = self._scalars["lambda"]
        for k in sorted(merged):
            prev = merged[k]
            update = project_out(prev, tau[k], self.alpha) if self.is_linear(k, prev.shape) else tau[k]
            merged[k] = prev * prev_lambda + update  # S, replacing τ⁽ᵗ⁻¹⁾ tensor by tensor
        s_norm = global_norm_sq(list(merged.values())) ** 0.5
        lam = s_norm / target if target > 0 and s_norm > 0 else 1.0
        for k in merged:
            merged[k].div_(lam)
        self._scalars["lambda"] = lam
        self._scalars["norm_sum"] = norm_sum

    def _merged(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._slots["merged"].items()}
