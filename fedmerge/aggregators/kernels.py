"""Fused accumulation kernels shared by the streaming aggregators.

Every streaming aggregator reduces to one of three per-coordinate folds over a *group* of client
tensors x_1..x_G (flattened, fp32):

* ``weighted_sum``:  acc += Σ_g w_g · x_g        (FedAvg, task arithmetic, DARE-linear)
* ``sign_split``:    with x̂_g = x_g · [|x_g| ≥ t_g] (TIES trim by a per-client threshold t_g),
                     S  += Σ_g v_g · e(x̂_g)      (vote; e = identity for "total", sign for "frequency")
                     P  += Σ_g w_g · max(x̂_g, 0),   N  += Σ_g w_g · min(x̂_g, 0)
                     Pc += Σ_g c_g · [x̂_g > 0],     Nc += Σ_g c_g · [x̂_g < 0]
                     (TIES, DARE-TIES, DELLA: sign election + disjoint mean are sums)
* ``max_abs``:       acc = x_g where |x_g| > |acc| (ties in magnitude go to the positive value)  (MagMax)

Folding a group of G clients at once reads the accumulators once per group instead of once per
client, so memory traffic is ≈ G·input + (accumulators) rather than G·(input + accumulators).
On the CPU the folds are numba kernels that work on cache-sized blocks of coordinates (one pass,
no temporaries, parallel over blocks; serial below :data:`PARALLEL_MIN_ELEMENTS`); on other devices
(CUDA) or without numba they are plain
torch expressions with the same semantics. Sparse inputs (sorted unique flat indices + values)
have their own kernels that touch only the non-zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.aggregators.kernel_runtime import (
    BLOCK,
    HAVE_NUMBA,
    PARALLEL_MIN_ELEMENTS,
    SPARSE_BLOCK,
    VOTE_FREQUENCY,
    VOTE_TOTAL,
    SizedKernel,
    as_f32,
    empty,
    flat32,
    njit,
    np_view,
    numba_enabled,
    prange,
    sized_kernel,
    torch_path,
    typed,
    use_numba,
    zeros,
)
from fedmerge.aggregators.topk import keep_mask, topk_threshold, topk_thresholds, trim_topk
from fedmerge.seeds import SPLITMIX_GAMMA, SPLITMIX_MIX1, SPLITMIX_MIX2

if HAVE_NUMBA:
    from fedmerge.seeds import splitmix_uniform

    @sized_kernel(fastmath=True)
    def _weighted_sum_dense(xs, w, acc):
        n = acc.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        for b in prange(nblocks):
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            a = acc[lo:hi]
            for g in range(len(xs)):
                wg = w[g]
                x = xs[g][lo:hi]
                for j in range(hi - lo):
                    a[j] += wg * x[j]

    @sized_kernel()
    def _weighted_sum_sparse(idx, val, wg, acc):
        n = idx.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        for b in prange(nblocks):  # indices are unique: blocks never write the same coordinate
            for k in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                acc[idx[k]] += wg * val[k]

    @sized_kernel(fastmath=True)
    def _sign_split_dense(xs, thr, cut, vote_w, w, count_w, mode, S, P, N, Pc, Nc):
        n = S.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange(nblocks):
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            s_ = S[lo:hi]
            p_ = P[lo:hi]
            n_ = N[lo:hi]
            pc_ = Pc[lo:hi]
            nc_ = Nc[lo:hi]
            for g in range(len(xs)):
                t = thr[g]
                c = cut[g] - lo  # entries tied with the threshold are kept only before this index
                vg = vote_w[g]
                wg = w[g]
                cg = count_w[g]
                x = xs[g][lo:hi]
                for j in range(hi - lo):
                    v = x[j]
                    m = abs(v)
                    v = v if (m > t or (m == t and j < c)) else zero
                    pv = max(v, zero)
                    nv = min(v, zero)
                    if mode == VOTE_TOTAL:
                        s_[j] += vg * v
                    else:
                        s_[j] += vg * ((one if v > zero else zero) - (one if v < zero else zero))
                    p_[j] += wg * pv
                    n_[j] += wg * nv
                    pc_[j] += cg if v > zero else zero
                    nc_[j] += cg if v < zero else zero

    @njit(inline="always")
    def _fold_sign_entry(j, v, t, vg, wg, cg, mode, S, P, N, Pc, Nc, zero, one):
        """One sparse entry (coordinate j, value v) into the sign-split accumulators, trimmed at t;
        branch-free: the sign of a delta is unpredictable. ``zero``/``one``: float32 0 and 1."""
        v = v if abs(v) >= t else zero
        pos = one if v > zero else zero
        neg = one if v < zero else zero
        S[j] += vg * (v if mode == VOTE_TOTAL else pos - neg)
        P[j] += wg * v * pos
        N[j] += wg * v * neg
        Pc[j] += cg * pos
        Nc[j] += cg * neg

    @sized_kernel(fastmath=True)
    def _sign_split_sparse(idx, val, t, vg, wg, cg, mode, S, P, N, Pc, Nc):
        n = idx.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange(nblocks):  # indices are unique: blocks never write the same coordinate
            for k in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                _fold_sign_entry(idx[k], val[k], t, vg, wg, cg, mode, S, P, N, Pc, Nc, zero, one)

    @sized_kernel(fastmath=True)
    def _sign_split_sparse_group(idxs, vals, starts, thr, vote_w, w, count_w, mode, S, P, N, Pc, Nc):
        # starts[g, b] .. starts[g, b + 1]: client g's entries inside coordinate block b (sorted indices)
        nblocks = starts.shape[1] - 1
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange(nblocks):  # blocks are disjoint coordinate ranges: no two threads share one
            for g in range(len(idxs)):  # per coordinate the clients fold in group order, as one by one
                idx = idxs[g]
                val = vals[g]
                t = thr[g]
                vg = vote_w[g]
                wg = w[g]
                cg = count_w[g]
                for k in range(starts[g, b], starts[g, b + 1]):
                    _fold_sign_entry(idx[k], val[k], t, vg, wg, cg, mode, S, P, N, Pc, Nc, zero, one)

    @sized_kernel(fastmath=True)
    def _max_abs_dense(xs, acc):
        n = acc.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        for b in prange(nblocks):
            lo = b * BLOCK
            hi = min(lo + BLOCK, n)
            a = acc[lo:hi]
            for g in range(len(xs)):
                x = xs[g][lo:hi]
                for j in range(hi - lo):
                    v = x[j]
                    m = abs(v)
                    c = abs(a[j])
                    if m > c or (m == c and v > a[j]):
                        a[j] = v

    @sized_kernel()
    def _max_abs_sparse(idx, val, acc):
        n = idx.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        for b in prange(nblocks):
            for k in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                j = idx[k]
                v = val[k]
                m = abs(v)
                c = abs(acc[j])
                if m > c or (m == c and v > acc[j]):
                    acc[j] = v


if HAVE_NUMBA:

    @sized_kernel(fastmath=True)
    def _disjoint_mean(S, P, N, Pc, Nc, scale, out):
        for j in prange(S.shape[0]):
            if S[j] >= 0:
                d = Pc[j]
                out[j] = scale * P[j] / (d if d != 0 else np.float32(1.0))
            else:
                d = Nc[j]
                out[j] = scale * N[j] / (d if d != 0 else np.float32(1.0))


def disjoint_mean(acc: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """λ · (S ≥ 0 ? P / Pc : N / Nc), with a zero divisor read as 1 (the coordinate is then 0)."""
    S, P, N, Pc, Nc = acc
    if use_numba(S):
        out = empty(S.numel(), S.device)
        _disjoint_mean.on(S.numel())(
            np_view(S), np_view(P), np_view(N), np_view(Pc), np_view(Nc), np.float32(scale), np_view(out)
        )
        return out
    positive = S >= 0
    total = torch.where(positive, P, N)
    div = torch.where(positive, Pc, Nc)
    return total / torch.where(div == 0, torch.ones_like(div), div) * scale


if HAVE_NUMBA:

    @sized_kernel()
    def _uniform(seed, out):
        for j in prange(out.shape[0]):
            out[j] = splitmix_uniform(seed, j)

    @sized_kernel()
    def _bernoulli_scale(x, density, scale, seed, out):
        for j in prange(x.shape[0]):
            out[j] = x[j] * scale if splitmix_uniform(seed, j) < density else np.float32(0.0)


def _splitmix_uniform_torch(seed: int, n: int, device: torch.device) -> torch.Tensor:
    """The same stream as the numba path, in int64 torch arithmetic (bits wrap like uint64)."""

    def as_signed(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v

    def shr(z: torch.Tensor, k: int) -> torch.Tensor:  # logical shift right on int64
        return (z >> k) & ((1 << (64 - k)) - 1)

    j = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    z = j * as_signed(SPLITMIX_GAMMA) + as_signed(seed)
    z = (z ^ shr(z, 30)) * as_signed(SPLITMIX_MIX1)
    z = (z ^ shr(z, 27)) * as_signed(SPLITMIX_MIX2)
    z = z ^ shr(z, 31)
    return shr(z, 11).double() * (1.0 / 9007199254740992.0)


def seeded_uniform(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n uniforms in [0, 1) (fp64): outputs 0..n−1 of SplitMix64 seeded with ``seed`` (counter-based,
    so any party holding the seed regenerates the same values, in parallel, on any device)."""
    dev = torch.device(device)
    if numba_enabled() and dev.type == "cpu":
        out = np.empty(n, dtype=np.float64)
        _uniform.on(n)(np.uint64(seed % (1 << 64)), out)
        return torch.from_numpy(out)
    return _splitmix_uniform_torch(seed % (1 << 64), n, dev)


def seeded_bernoulli_scale(x: torch.Tensor, density: float, scale: float, seed: int) -> torch.Tensor:
    """x_j · scale where u_j < density, else 0, with u = :func:`seeded_uniform` (one fused pass)."""
    flat = x.detach().reshape(-1)
    if use_numba(flat):
        out = empty(flat.numel(), flat.device)
        _bernoulli_scale.on(flat.numel())(
            np_view(flat.contiguous()), density, np.float32(scale), np.uint64(seed % (1 << 64)), np_view(out)
        )
        return out.reshape(x.shape)
    keep = seeded_uniform(flat.numel(), seed, flat.device) < density
    return torch.where(keep, flat.float() * scale, torch.zeros((), device=flat.device)).reshape(x.shape)


def weighted_sum_dense(xs: Sequence[torch.Tensor], weights: Sequence[float], acc: torch.Tensor) -> None:
    """acc += Σ_g w_g · x_g (acc is flat fp32; xs any floating dtype, flattened)."""
    flats = [flat32(x, acc.device) for x in xs]
    if use_numba(acc):
        kernel = _weighted_sum_dense.on(acc.numel() * len(flats))
        kernel(typed.List([np_view(x) for x in flats]), as_f32(weights), np_view(acc))
        return
    for x, w in zip(flats, weights, strict=True):
        acc.add_(x, alpha=float(w))


def weighted_sum_sparse(
    indices: torch.Tensor, values: torch.Tensor, weight: float, acc: torch.Tensor
) -> None:
    """acc[indices] += w · values (indices sorted and unique)."""
    vals = flat32(values, acc.device)
    if use_numba(acc):
        kernel = _weighted_sum_sparse.on(vals.numel())
        kernel(np_view(indices.to(torch.int64)), np_view(vals), np.float32(weight), np_view(acc))
        return
    acc.index_add_(0, indices.to(device=acc.device, dtype=torch.int64), vals, alpha=float(weight))


def sign_split_dense(
    xs: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    tie_cuts: Sequence[int],
    vote_weights: Sequence[float],
    weights: Sequence[float],
    count_weights: Sequence[float],
    mode: int,
    acc: Sequence[torch.Tensor],
) -> None:
    """Fold a group into the five TIES accumulators ``acc = (S, P, N, Pc, Nc)`` (see module docstring)."""
    S, P, N, Pc, Nc = acc
    flats = [flat32(x, S.device) for x in xs]
    if use_numba(S):
        _sign_split_dense.on(S.numel() * len(flats))(
            typed.List([np_view(x) for x in flats]),
            as_f32(thresholds),
            np.asarray(tie_cuts, dtype=np.int64),
            as_f32(vote_weights),
            as_f32(weights),
            as_f32(count_weights),
            mode,
            *[np_view(a) for a in acc],
        )
        return
    for x, t, cut, vg, wg, cg in zip(
        flats, thresholds, tie_cuts, vote_weights, weights, count_weights, strict=True
    ):
        v = torch.where(keep_mask(x, t, cut), x, torch.zeros((), device=x.device))
        pos, neg = v > 0, v < 0
        S.add_(v if mode == VOTE_TOTAL else pos.float() - neg.float(), alpha=float(vg))
        P.add_(v.clamp(min=0), alpha=float(wg))
        N.add_(v.clamp(max=0), alpha=float(wg))
        Pc.add_(pos.float(), alpha=float(cg))
        Nc.add_(neg.float(), alpha=float(cg))


def sign_split_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    threshold: float,
    vote_weight: float,
    weight: float,
    count_weight: float,
    mode: int,
    acc: Sequence[torch.Tensor],
) -> None:
    """Sparse twin of :func:`sign_split_dense` for one client."""
    S, P, N, Pc, Nc = acc
    vals = flat32(values, S.device)
    if use_numba(S):
        _sign_split_sparse.on(vals.numel())(
            np_view(indices.to(torch.int64)),
            np_view(vals),
            np.float32(threshold),
            np.float32(vote_weight),
            np.float32(weight),
            np.float32(count_weight),
            mode,
            *[np_view(a) for a in acc],
        )
        return
    keep = (vals.abs() >= threshold) & (vals != 0)
    idx = indices.to(device=S.device, dtype=torch.int64)[keep]
    v = vals[keep]
    pos, neg = v > 0, v < 0
    S.index_add_(0, idx, v if mode == VOTE_TOTAL else pos.float() - neg.float(), alpha=float(vote_weight))
    P.index_add_(0, idx[pos], v[pos], alpha=float(weight))
    N.index_add_(0, idx[neg], v[neg], alpha=float(weight))
    Pc.index_add_(0, idx[pos], torch.ones_like(v[pos]), alpha=float(count_weight))
    Nc.index_add_(0, idx[neg], torch.ones_like(v[neg]), alpha=float(count_weight))


def _sorted_by_index(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) in increasing index order; the arrays themselves when already sorted."""
    if indices.shape[0] < 2 or bool(np.all(indices[1:] > indices[:-1])):
        return indices, values
    order = np.argsort(indices, kind="stable")
    return indices[order], values[order]


def sign_split_sparse_group(
    indices: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    vote_weights: Sequence[float],
    weights: Sequence[float],
    count_weights: Sequence[float],
    mode: int,
    acc: Sequence[torch.Tensor],
) -> None:
    """Fold a group of sparse clients into ``acc = (S, P, N, Pc, Nc)``; the result is bit-identical to
    :func:`sign_split_sparse` called for each client in order.

    Client g contributes x̂_gj = v_gk · [|v_gk| ≥ t_g] at j = indices_g[k] (indices unique; sorted or
    not). On the CPU the accumulators are cut into blocks of :data:`SPARSE_BLOCK` coordinates and each
    block takes every client's entries in it, in group order, while it sits in cache: accumulator
    traffic is once per group instead of once per client. Every coordinate receives the same
    additions in the same order as the one-by-one fold (an index occurs once per client), so the sums
    are exactly equal. Unsorted indices are sorted first (a copy of that client's entries).
    """
    S = acc[0]
    if len(indices) != len(values):
        raise ValueError(f"got {len(indices)} index tensors but {len(values)} value tensors")
    if not use_numba(S) or not indices:
        for idx, val, t, vg, wg, cg in zip(
            indices, values, thresholds, vote_weights, weights, count_weights, strict=True
        ):
            sign_split_sparse(idx, val, t, vg, wg, cg, mode, acc)
        return
    n = S.numel()
    bounds = np.minimum(np.arange(0, n + SPARSE_BLOCK, SPARSE_BLOCK, dtype=np.int64), n)
    if bounds[-1] != n:
        bounds = np.append(bounds, n)
    idxs = []
    vals = []
    starts = np.empty((len(indices), bounds.shape[0]), dtype=np.int64)
    for g, (idx_t, val_t) in enumerate(zip(indices, values, strict=True)):
        idx, val = _sorted_by_index(
            np_view(idx_t.to(torch.int64).contiguous()), np_view(flat32(val_t, S.device))
        )
        if idx.shape[0] != val.shape[0]:
            raise ValueError(f"client {g}: {idx.shape[0]} indices but {val.shape[0]} values")
        starts[g] = np.searchsorted(idx, bounds)
        idxs.append(idx)
        vals.append(val)
    _sign_split_sparse_group.on(sum(v.shape[0] for v in vals))(
        typed.List(idxs),
        typed.List(vals),
        starts,
        as_f32(thresholds),
        as_f32(vote_weights),
        as_f32(weights),
        as_f32(count_weights),
        mode,
        *[np_view(a) for a in acc],
    )


def max_abs_dense(xs: Sequence[torch.Tensor], acc: torch.Tensor) -> None:
    """acc_j ← x_gj where |x_gj| > |acc_j|; on equal magnitude the positive value wins (order-free)."""
    flats = [flat32(x, acc.device) for x in xs]
    if use_numba(acc):
        _max_abs_dense.on(acc.numel() * len(flats))(typed.List([np_view(x) for x in flats]), np_view(acc))
        return
    for x in flats:
        take = (x.abs() > acc.abs()) | ((x.abs() == acc.abs()) & (x > acc))
        torch.where(take, x, acc, out=acc)


def max_abs_sparse(indices: torch.Tensor, values: torch.Tensor, acc: torch.Tensor) -> None:
    """Sparse twin of :func:`max_abs_dense` for one client."""
    vals = flat32(values, acc.device)
    if use_numba(acc):
        _max_abs_sparse.on(vals.numel())(np_view(indices.to(torch.int64)), np_view(vals), np_view(acc))
        return
    idx = indices.to(device=acc.device, dtype=torch.int64)
    cur = acc[idx]
    take = (vals.abs() > cur.abs()) | ((vals.abs() == cur.abs()) & (vals > cur))
    acc[idx] = torch.where(take, vals, cur)


__all__ = [
    "BLOCK",
    "HAVE_NUMBA",
    "PARALLEL_MIN_ELEMENTS",
    "SPARSE_BLOCK",
    "VOTE_FREQUENCY",
    "VOTE_TOTAL",
    "SizedKernel",
    "disjoint_mean",
    "empty",
    "keep_mask",
    "max_abs_dense",
    "max_abs_sparse",
    "seeded_bernoulli_scale",
    "seeded_uniform",
    "sign_split_dense",
    "sign_split_sparse",
    "sign_split_sparse_group",
    "topk_threshold",
    "topk_thresholds",
    "torch_path",
    "trim_topk",
    "use_numba",
    "weighted_sum_dense",
    "weighted_sum_sparse",
    "zeros",
]
