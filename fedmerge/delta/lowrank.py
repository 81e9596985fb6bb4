"""Low-rank compression of task vectors: TSV-C (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri &
Rodolà, CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

Per 2-D tensor (a matrix) τ of shape (m, n) with thin SVD τ = U diag(σ) Vᵀ (σ₁ ≥ σ₂ ≥ …):

    τ_k = U[:, :k] diag(σ[:k]) V[:, :k]ᵀ                 (the best rank-k approximation, Eckart–Young)
    ‖τ − τ_k‖_F² = Σ_{j>k} σ_j²,   ‖τ − τ_k‖₂ = σ_{k+1}

TSV-C keeps a fraction 1/T of each matrix's singular components, T the number of tasks merged:
k = max(1, ⌊min(m, n)/T⌋). Every other tensor (biases, norms, 1-D, 3-D+) is unchanged, as in the
paper, which compresses only the layers' matrices. The rank is floored at 1 here so that no matrix of
a client's update is dropped entirely when T > min(m, n); ``tsv_m``'s own per-task compression
(:mod:`fedmerge.aggregators.tsv`) follows the official code's ⌊min(m, n)/T⌋.

A client applies it to its task vector before the codec (``clients/app.py``: node-config key
``tsv-c-tasks``), so what the codec sparsifies and quantises is the rank-k matrix; the discarded
components are not carried over by error feedback (they are not sent in any round). SVDs run in fp32
(fp64 for fp64 inputs); the result has the input's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedmerge.errors import ConfigError


def tsv_rank(shape: tuple[int, ...], num_tasks: int) -> int:
    """TSV-C's rank for a matrix of ``shape`` and ``num_tasks`` tasks: max(1, ⌊min(m, n)/T⌋)."""
    return max(1, min(shape) // num_tasks)


def low_rank(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the best rank-``k`` approximation of matrix ``x``, the singular values it discards)."""
    if x.dim() != 2:
        raise ConfigError(f"low_rank needs a matrix, got a tensor of shape {tuple(x.shape)}")
    if k < 1:
        raise ConfigError(f"rank k must be ≥ 1, got {k}")
    work = x.double() if x.dtype == torch.float64 else x.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    approx = (u[:, :k] * s[:k]) @ vh[:k, :]
    return approx.to(x.dtype), s[k:]


def compress_to_rank(
    delta: Mapping[str, torch.Tensor], rank_of: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Each matrix named in ``rank_of`` replaced by its best rank-``rank_of[name]`` approximation (a rank
    ≥ min(m, n) leaves it unchanged); every other tensor returned as it is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        k = rank_of.get(name)
        if k is None or t.dim() != 2 or not t.is_floating_point() or k >= min(t.shape):
            out[name] = t
        else:
            out[name] = low_rank(t, k)[0]
    return out


def tsv_compress(delta: Mapping[str, torch.Tensor], num_tasks: int) -> dict[str, torch.Tensor]:
    """TSV-C of a task vector for ``num_tasks`` tasks: every floating matrix at rank
    :func:`tsv_rank`, the other tensors unchanged."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ConfigError(
            f"tsv-c-tasks must be an integer ≥ 1 (the number of tasks merged), got {num_tasks!r}"
        )
    ranks = {n: tsv_rank(tuple(t.shape), num_tasks) for n, t in delta.items() if t.dim() == 2}
    return compress_to_rank(delta, ranks)
