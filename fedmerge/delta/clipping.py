"""Client-side L2 clipping of a whole delta, the first step of user-level DP-FedAvg and of norm bounding.

    τ̄ = τ · min(1, C / ‖τ‖₂),   ‖τ‖₂ over every tensor of the delta together (fp64)

(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", flat clipping;
Sun et al. 2019, "Can You Really Backdoor Federated Learning?", norm bounding.) For DP the clip must
come *before* any sparsification, quantisation or trimming: those steps are post-processing of τ̄
and never raise its norm, so the sensitivity of the sum stays C. A delta already within the bound is
returned unchanged (the same tensors, not copies); a clipped one comes back in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeAlias

import torch

from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError, InvalidSubmission

DeltaTensor: TypeAlias = torch.Tensor | SparseTensor


def check_max_norm(max_norm: float) -> float:
    """A clip bound must be finite and > 0."""
    c = float(max_norm)
    if not (c > 0 and math.isfinite(c)):
        raise ConfigError(f"max_norm (the clip bound C) must be finite and > 0, got {max_norm!r}")
    return c


def delta_norm(delta: Mapping[str, DeltaTensor]) -> float:
    """‖τ‖₂ over all tensors (sparse ones over their values), in fp64.

    Raises :class:`InvalidSubmission` naming the first tensor (sorted order) that holds NaN or Inf:
    a non-finite delta has no norm and must be rejected, not clipped.
    """
    total = 0.0
    for name in sorted(delta):
        x = delta[name]
        values = x.values if isinstance(x, SparseTensor) else x
        sq = float(values.detach().to(torch.float64).pow(2).sum())
        if not math.isfinite(sq):
            if not bool(torch.isfinite(values).all()):
                raise InvalidSubmission(
                    f"tensor {name!r} holds NaN or Inf; the delta cannot be clipped. "
                    "Recompute it from finite weights"
                )
            raise InvalidSubmission(f"tensor {name!r} is too large to have a finite L2 norm in fp64")
        total += sq
    return math.sqrt(total)


def clip_factor(norm: float, max_norm: float) -> float:
    """min(1, C / ‖τ‖) (1 for a zero delta)."""
    c = check_max_norm(max_norm)
    return 1.0 if norm <= c else c / norm


def scale_delta(delta: Mapping[str, DeltaTensor], factor: float) -> dict[str, DeltaTensor]:
    """factor · τ in fp32 (sparse tensors keep their indices)."""
    out: dict[str, DeltaTensor] = {}
    for name, x in delta.items():
        if isinstance(x, SparseTensor):
            out[name] = SparseTensor(x.indices, x.values.float() * factor, x.shape)
        else:
            out[name] = x.float() * factor
    return out


def clip_delta(delta: Mapping[str, DeltaTensor], max_norm: float) -> tuple[dict[str, DeltaTensor], float]:
    """(τ · min(1, C/‖τ‖), ‖τ‖): the clipped delta and the original norm."""
    c = check_max_norm(max_norm)
    norm = delta_norm(delta)
    factor = clip_factor(norm, c)
    if factor == 1.0:
        return dict(delta), norm
    return scale_delta(delta, factor), norm
