"""Low-rank stage: a 2-D tensor sent as a rank-r factor pair instead of its entries.

A matrix Δ (m × n) is sent as P (m × r) and Q (r × n), r ≪ min(m, n), and read back as Δ̂ = P·Q:
r·(m + n) values instead of m·n. The encoder takes the best rank-r approximation in the Frobenius norm
(Eckart–Young): with the SVD Δ = U Σ Vᵀ,

    P = U_r Σ_r^½,    Q = Σ_r^½ V_rᵀ,

the singular values split evenly between the factors so both have the same scale and quantise alike
(the values stage then stores P ‖ Q with its per-block scales). With error feedback, what the
truncation and the quantisation drop (Δ − Δ̂) is carried to the next round: low-rank compression with
error feedback as in PowerSGD (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression
for Distributed Optimization"), which takes one power iteration per round where this stage takes the
truncated SVD. A LoRA update (α/r)·B·A of rank r is sent exactly (up to the value encoding) at the
adapter's own rank.

Matrices with min(m, n) ≤ ``EXACT_SVD_MAX_DIM`` get an exact SVD; larger ones the randomized range
finder of Halko, Martinsson & Tropp 2011 (Alg. 4.4: r + 8 columns, two power iterations with QR
re-orthonormalisation, a fixed-seed generator, so encoding is deterministic), then the SVD of the
small projected matrix. Either way the decoder only multiplies: the method is the encoder's choice.
"""

from __future__ import annotations

import math

import torch

from fedmerge.errors import CodecError

EXACT_SVD_MAX_DIM = 512
OVERSAMPLING = 8
POWER_ITERATIONS = 2
_SKETCH_SEED = 0x5EED
_CHUNK_ENTRIES = 1 << 16  # entries of the product accumulated together (a core's cache in fp64)


def factored_numel(shape: tuple[int, ...], rank: int) -> int:
    """Values a rank-``rank`` factor pair of a 2-D ``shape`` carries: rank·(rows + cols)."""
    rows, cols = shape
    return rank * (rows + cols)


def qualifies(shape: tuple[int, ...], rank: int) -> bool:
    """Whether the encoder sends a tensor of ``shape`` as a factor pair at ``rank``: 2-D, rank below
    both sides, and the factors at most half the entries (otherwise they save too little to lose
    anything to the truncation)."""
    if rank < 1 or len(shape) != 2 or rank >= min(shape):
        return False
    return 2 * factored_numel(shape, rank) <= math.prod(shape)


def factorize(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """P ‖ Q flattened (rank·(m + n) fp32 values) for the best rank-``rank`` approximation of the 2-D
    fp32 ``matrix`` (see the module docstring)."""
    if matrix.dim() != 2 or not 1 <= rank < min(matrix.shape):
        raise CodecError(f"a rank-{rank} factor pair needs a 2-D tensor with both sides > {rank}")
    rows, cols = matrix.shape
    if min(rows, cols) <= EXACT_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(matrix, rank)
    root = s[:rank].sqrt()
    p = u[:, :rank] * root
    q = root[:, None] * vh[:rank]
    return torch.cat([p.reshape(-1), q.reshape(-1)]).contiguous()


def _randomized_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al. 2011, Alg. 4.4 + 5.1: an orthonormal basis of the range by subspace iteration,
    then the SVD of the projection. Deterministic: its own generator with a fixed seed."""
    cols = matrix.shape[1]
    width = min(rank + OVERSAMPLING, min(matrix.shape))
    gen = torch.Generator().manual_seed(_SKETCH_SEED)
    omega = torch.randn(cols, width, generator=gen, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(POWER_ITERATIONS):
        side, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ side)
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def product(values: torch.Tensor, shape: tuple[int, ...], rank: int) -> torch.Tensor:
    """The m × n fp32 tensor P·Q from the flat P ‖ Q ``values`` (m·rank then rank·n, row-major).

    Bit-identical on every machine, so a server and its nodes rebuild the same weights: each product
    of two fp32 values is exact in fp64, the sum over k runs in order 0…r−1 in fp64 (elementwise, no
    BLAS, whose summation order is its own), and the result is rounded once to fp32."""
    rows, cols = shape
    p = values[: rows * rank].reshape(rows, rank).to(torch.float64)
    q = values[rows * rank :].reshape(rank, cols).to(torch.float64)
    out = torch.empty(rows, cols, dtype=torch.float32)
    step = max(1, _CHUNK_ENTRIES // max(1, cols))
    for start in range(0, rows, step):
        part = p[start : start + step]
        acc = part[:, 0:1] * q[0:1]
        for k in range(1, rank):  # a fused multiply-add rounds p·q + acc once: p·q is exact anyway
            acc.addcmul_(part[:, k : k + 1], q[k : k + 1])
        out[start : start + step] = acc
    return out
