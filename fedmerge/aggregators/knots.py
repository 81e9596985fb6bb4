"""KnOTS: merging LoRA adapters after aligning them with one SVD (Stoica, Ramesh, Ecsedi, Choshen &
Hoffman, ICLR 2025, "Model Merging with SVD to Tie the KnOTS", arXiv 2410.19735; reference code
``gstoica27/KnOTS``, ``task_merger.py``, ``SVDMerger.apply_svd`` and ``SVDMerger.merge``).

Per adapted module, T adapters with ΔW_i = s_i·B_i·A_i (m × n; ranks may differ):

    [ΔW_1 | … | ΔW_T] = U Σ [V_1 | … | V_T]       (thin SVD of the m × T·n concatenation, float64)
    keep the k numerically non-zero singular triplets (k ≤ min(m, Σ r_i))
    X_i = Σ V_i                                   (k × n: task i's coordinates in the shared basis U)
    X   = merge(X_1, …, X_T)                      (any registered method: task_arithmetic, ties …)
    ΔW  = U X

U is a shared, orthonormal basis of every ΔW_i's column space and ΔW_i = U X_i exactly, so a linear
merge equals the same merge of the dense ΔW_i; TIES' trimming and sign election act on the aligned
X_i, where the tasks' coordinates are comparable (the paper's point). The reference merges
diag(s)·V_i ("simple and safe for all merging methods") and multiplies by U; its mask functions and
the final mean/sum are here the registered method (``ties`` trims, elects signs and takes the
disjoint mean as TIES does). The merged update is returned as the LoRA adapter B' = U, A' = X
(scaling 1, rank k per module): exact, no truncation.

Rank rule: the reference keeps s > 1e-5 (absolute); this keeps s > max(m, T·n)·ε_fp32·s_max, the
numerical rank of the fp32 inputs, so adapters of small magnitude are not cut. Both keep every
direction of well-conditioned updates.

Streaming: not a streaming ``Aggregator``. The shared basis U needs every adapter's ΔW of a module at
once, and the output rank k is not the inputs' shape, while fedmerge's streaming contract folds one
client's tensor per key into a fixed-shape accumulator. So this is an adapter-level merge like
:func:`fedmerge.delta.lora.merge_lora`: it holds the T dense m × n updates of one module at a time
(O(T·m·n)) for :func:`knots_matrix`; :func:`knots_merge` works from the factors
(:func:`knots_components_factored`, O((m + T·n)·Σr) memory) and never forms them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedmerge.aggregators.base import merge
from fedmerge.aggregators.core_space import merge_by_module
from fedmerge.delta.lora import LoraAdapter

KNOTS_KEY = "v"


def knots_components(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U, [Σ V_1, …, Σ V_T]) in float64 from the SVD of [ΔW_1 | … | ΔW_T], numerically-zero
    singular triplets removed (module docstring)."""
    stack = torch.cat([d.to(torch.float64) for d in deltas], dim=1)
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    if s.numel():
        keep = s > max(stack.shape) * torch.finfo(torch.float32).eps * float(s[0])
        u, s, vh = u[:, keep], s[keep], vh[keep]
    n = deltas[0].shape[1]
    return u, [s[:, None] * v for v in torch.split(vh, n, dim=1)]


def knots_components_factored(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`knots_components` from factors [(A_i, s_i·B_i)] without forming the m × T·n concatenation:
    [ΔW_1 | … | ΔW_T] = B_stack · blockdiag(A_1, …, A_T), so with thin QRs B_stack = Q_B R_B and
    blockdiag(A)ᵀ = Q_A R_A its SVD is (Q_B u) s (vh Q_Aᵀ) for the small SVD R_B R_Aᵀ = u s vh —
    O((m + T·n)·(Σr)²) instead of O(m·T·n·min(m, T·n)). Equal to the dense form up to the sign of each
    singular pair, which cancels in U·merge(Σ V_i) for sign-equivariant methods (linear, TIES)."""
    b_stack = torch.cat([b.to(torch.float64) for _, b in factors], dim=1)
    a_blocks = torch.block_diag(*[a.to(torch.float64) for a, _ in factors])
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_blocks.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    if s.numel():
        m, n = b_stack.shape[0], factors[0][0].shape[1]
        keep = s > max(m, len(factors) * n) * torch.finfo(torch.float32).eps * float(s[0])
        u, s, vh = u[:, keep], s[keep], vh[keep]
    v = vh @ q_a.T
    n = factors[0][0].shape[1]
    return q_b @ u, [s[:, None] * part for part in torch.split(v, n, dim=1)]


def knots_matrix(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str = "task_arithmetic",
    **params: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module's dense updates ΔW_i with KnOTS; returns (B', A') in fp32, ΔW_merged = B'·A'.
    ``method`` names a registered aggregator applied to the aligned Σ V_i with ``weights``/``params``."""
    return _merged(*knots_components(deltas), tuple(deltas[0].shape), weights, method, params)


def _merged(
    u: torch.Tensor,
    parts: list[torch.Tensor],
    shape: tuple[int, ...],
    weights: Sequence[float],
    method: str,
    params: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    if u.shape[1] == 0:  # every update is zero: a rank-1 zero adapter (peft has no rank 0)
        return torch.zeros(shape[0], 1), torch.zeros(1, shape[1])
    merged = merge(method, [{KNOTS_KEY: p.float()} for p in parts], weights, **params)
    return u.float(), merged[KNOTS_KEY].float()


def knots_merge(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    **params: Any,
) -> LoraAdapter:
    """Merge LoRA adapters module by module with KnOTS and a registered ``method`` (``task_arithmetic``,
    ``ties`` …; ``params`` are its parameters).

    Weights default to 1 each and are passed to ``method`` as they are (task arithmetic sums them:
    use ``normalize=True`` for a weighted mean). Ranks may differ between adapters and modules.
    The result has scaling 1 per module and each module's own rank (``rank_pattern`` on save)."""

    def merge_module(
        pairs: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int], ws: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u, xs = knots_components_factored(pairs)
        return _merged(u, xs, shape, ws, method, params)

    return merge_by_module(adapters, weights, "knots_merge", merge_module)
