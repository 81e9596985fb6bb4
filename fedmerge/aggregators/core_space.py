"""Core Space merging of LoRA adapters (Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov,
Calderara & van de Weijer, NeurIPS 2025, "Accurate and Efficient Low-Rank Model Merging in Core
Space", arXiv 2509.17786; reference code ``apanariello4/core-space-merging``, ``task_merger.py``,
``MatrixPerLayerMerger.get_core_matrices`` and the ``merge_space == 'core'`` branch).

Per adapted module, T adapters with ΔW_i = s_i·B_i·A_i (B_i: m × r_i, A_i: r_i × n; ranks may differ):

    A_stack = [A_1; …; A_T]   ((Σ r_i) × n),     B_stack = [s_1 B_1 | … | s_T B_T]   (m × Σ r_i)
    V_A = rows of Vh in SVD(A_stack)              (orthonormal basis of every A_i's row space)
    U_B = columns of U in SVD(B_stack)            (orthonormal basis of every B_i's column space)
    M_i = U_Bᵀ ΔW_i V_Aᵀ                          (the core: min(m, Σr) × min(n, Σr))
    M   = merge(M_1, …, M_T)                      (any registered method: task_arithmetic, ties, iso_c …)
    ΔW  = U_B M V_A

The projection is lossless: ΔW_i's columns lie in span(U_B) and its rows in span(V_A), so
U_B M_i V_A = ΔW_i exactly (to float rounding). Hence for a linear merge (task arithmetic,
weighted mean) the result equals the same merge of the dense ΔW_i; non-linear merges (TIES' sign
election and trimming, Iso-C's flattened spectrum) act on the small aligned cores instead of the
m × n products, which is the method's point. The merged update is returned as a LoRA adapter
B' = U_B M, A' = V_A (or B' = U_B, A' = M V_A when m is the smaller side; scaling 1) of rank
min(m, n, Σ r_i) per module — exact, no truncation.

The reference computes M_i from per-task SVDs of A_i and B_i (Σ_B V_Bᵀ U_A Σ_A, aligned by
U_Bᵀ U_B,i and V_A,i V_Aᵀ) and notes that ``U_Bᵀ B A V_Aᵀ`` is the same matrix; this module uses the
direct form. SVDs run in float64 as in the reference; the result is fp32. The per-task scaling
s_i (peft's α/r) is folded into B_i, which leaves span(U_B) unchanged.

Streaming: not a streaming ``Aggregator``. The shared bases need every adapter's A and B of a module
at once, and the output rank (Σ r_i) is not the input tensors' shape, while fedmerge's streaming
contract folds one client's tensor per key into a fixed-shape accumulator. So this is an
adapter-level merge like :func:`fedmerge.delta.lora.merge_lora`: it holds all T adapters
(O(Σ_i r_i·(m + n)) per module, the size of the inputs) and one (Σr)² core per adapter at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedmerge.aggregators.base import merge
from fedmerge.delta.lora import LoraAdapter, LoraError, LoraModule, _check_same_modules, _weights

CORE_KEY = "core"


def core_space_bases(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_B, V_A) for factors [(A_i, s_i·B_i)]: orthonormal bases (float64) of the stacked B columns
    (m × min(m, Σr)) and the stacked A rows (min(n, Σr) × n)."""
    a_stack = torch.cat([a.to(torch.float64) for a, _ in factors], dim=0)
    b_stack = torch.cat([b.to(torch.float64) for _, b in factors], dim=1)
    v_a = torch.linalg.svd(a_stack, full_matrices=False)[2]
    u_b = torch.linalg.svd(b_stack, full_matrices=False)[0]
    return u_b, v_a


def core_space_matrix(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    method: str = "task_arithmetic",
    **params: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module in core space; returns (B', A') in fp32 with ΔW_merged = B'·A'.

    ``factors`` are [(A_i, s_i·B_i)]; ``method`` names a registered aggregator applied to the cores
    M_i with ``weights`` and ``params`` (module docstring)."""
    u_b, v_a = core_space_bases(factors)
    cores = [{CORE_KEY: (u_b.T @ b.to(torch.float64)) @ (a.to(torch.float64) @ v_a.T)} for a, b in factors]
    merged = merge(method, [{k: c.float() for k, c in core.items()} for core in cores], weights, **params)
    m = merged[CORE_KEY].to(torch.float64)
    if u_b.shape[1] < v_a.shape[0]:  # m < min(n, Σr): the narrower side gives the smaller rank
        return u_b.float(), (m @ v_a).float()
    return (u_b @ m).float(), v_a.float()


def core_space_merge(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    **params: Any,
) -> LoraAdapter:
    """Merge LoRA adapters module by module in their shared core space with a registered ``method``
    (``task_arithmetic``, ``ties``, ``iso_c`` …; ``params`` are its parameters).

    Weights default to 1 each and are passed to ``method`` as they are (task arithmetic sums them:
    use ``normalize=True`` for a weighted mean). Ranks may differ between adapters and modules.
    The result has scaling 1 per module and each module's own rank (``rank_pattern`` on save)."""
    return merge_by_module(
        adapters,
        weights,
        "core_space_merge",
        lambda pairs, shape, ws: core_space_matrix(pairs, ws, method, **params),
    )


ModuleMerge = Callable[
    [list[tuple[torch.Tensor, torch.Tensor]], tuple[int, int], list[float]], tuple[torch.Tensor, torch.Tensor]
]
"""(factor pairs (A_i, s_i·B_i), the module's (out, in) shape, weights) → the merged module's (B, A)."""


def merge_by_module(
    adapters: Sequence[LoraAdapter], weights: Sequence[float] | None, what: str, merge_module: ModuleMerge
) -> LoraAdapter:
    """The frame of the adapter-level merges (core space, KnOTS): weights default to 1 each, every
    adapter has the same modules, stored out × in; each module's factor pairs (A_i, s_i·B_i) are merged
    by ``merge_module`` into a scaling-1 module, and the result is :func:`lora_result`."""
    ws = _weights(adapters, weights)
    _check_same_modules(adapters)
    if adapters[0].fan_in_fan_out:
        raise LoraError(f"{what} needs adapters stored as out × in (fan_in_fan_out is False)")
    modules: dict[str, LoraModule] = {}
    for name in adapters[0].modules:
        parts = [ad.modules[name] for ad in adapters]
        pairs = [(p.A, p.scaling * p.B.float()) for p in parts]
        b, a = merge_module(pairs, (parts[0].B.shape[0], parts[0].A.shape[1]), ws)
        modules[name] = LoraModule(a, b, 1.0)
    return lora_result(adapters[0], modules)


def lora_result(first: LoraAdapter, modules: dict[str, LoraModule]) -> LoraAdapter:
    """An adapter of the given scaling-1 modules with ``first``'s settings: rank = the largest module
    rank, α = rank (so peft's α/r is 1 there; other ranks go to ``rank_pattern`` on save)."""
    rank = max((m.rank for m in modules.values()), default=first.rank)
    return LoraAdapter(
        modules,
        rank,
        float(rank),
        first.target_modules,
        False,
        first.fan_in_fan_out,
        dict(first.config),
    )
