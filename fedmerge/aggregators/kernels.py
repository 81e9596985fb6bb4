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
no temporaries, parallel over blocks); on other devices (CUDA) or without numba they are plain
torch expressions with the same semantics. Sparse inputs (sorted unique flat indices + values)
have their own kernels that touch only the non-zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

try:  # numba is a declared dependency; the torch path keeps GPUs (and odd platforms) working
    from numba import njit, prange, typed

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

BLOCK = 4096  # coordinates per block: 5 fp32 accumulators × 16 KiB stay in L1/L2 while G inputs stream
VOTE_TOTAL = 0
VOTE_FREQUENCY = 1

if HAVE_NUMBA:

    @njit(parallel=True, cache=True, fastmath=True)
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

    @njit(parallel=True, cache=True)
    def _weighted_sum_sparse(idx, val, wg, acc):
        n = idx.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        for b in prange(nblocks):  # indices are unique: blocks never write the same coordinate
            for k in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                acc[idx[k]] += wg * val[k]

    @njit(parallel=True, cache=True, fastmath=True)
    def _sign_split_dense(xs, thr, vote_w, w, count_w, mode, S, P, N, Pc, Nc):
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
                vg = vote_w[g]
                wg = w[g]
                cg = count_w[g]
                x = xs[g][lo:hi]
                for j in range(hi - lo):
                    v = x[j]
                    v = v if abs(v) >= t else zero
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

    @njit(parallel=True, cache=True)
    def _sign_split_sparse(idx, val, t, vg, wg, cg, mode, S, P, N, Pc, Nc):
        n = idx.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        zero = np.float32(0.0)
        for b in prange(nblocks):
            for k in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                v = val[k]
                if abs(v) < t or v == zero:
                    continue
                j = idx[k]
                if mode == VOTE_TOTAL:
                    S[j] += vg * v
                else:
                    S[j] += vg if v > zero else -vg
                if v > zero:
                    P[j] += wg * v
                    Pc[j] += cg
                else:
                    N[j] += wg * v
                    Nc[j] += cg

    @njit(parallel=True, cache=True, fastmath=True)
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

    @njit(parallel=True, cache=True)
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

    @njit(parallel=True, cache=True)
    def _count_band(a, lo, hi):
        """(#{|a| > hi}, #{lo ≤ |a| ≤ hi}) in one parallel pass."""
        above = 0
        band = 0
        for j in prange(a.shape[0]):
            v = abs(a[j])
            if v > hi:
                above += 1
            elif v >= lo:
                band += 1
        return above, band

    @njit(cache=True)
    def _gather_band(a, lo, hi, out):
        k = 0
        for j in range(a.shape[0]):
            v = abs(a[j])
            if lo <= v <= hi:
                out[k] = v
                k += 1
        return k


def _use_numba(*tensors: torch.Tensor) -> bool:
    return HAVE_NUMBA and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


def _flat32(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Flat, contiguous fp32 view (a copy only when dtype, device or layout require it)."""
    return x.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _as_f32(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def weighted_sum_dense(xs: Sequence[torch.Tensor], weights: Sequence[float], acc: torch.Tensor) -> None:
    """acc += Σ_g w_g · x_g (acc is flat fp32; xs any floating dtype, flattened)."""
    flats = [_flat32(x, acc.device) for x in xs]
    if _use_numba(acc):
        _weighted_sum_dense(typed.List([_np(x) for x in flats]), _as_f32(weights), _np(acc))
        return
    for x, w in zip(flats, weights, strict=True):
        acc.add_(x, alpha=float(w))


def weighted_sum_sparse(
    indices: torch.Tensor, values: torch.Tensor, weight: float, acc: torch.Tensor
) -> None:
    """acc[indices] += w · values (indices sorted and unique)."""
    vals = _flat32(values, acc.device)
    if _use_numba(acc):
        _weighted_sum_sparse(_np(indices.to(torch.int64)), _np(vals), np.float32(weight), _np(acc))
        return
    acc.index_add_(0, indices.to(device=acc.device, dtype=torch.int64), vals, alpha=float(weight))


def sign_split_dense(
    xs: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    vote_weights: Sequence[float],
    weights: Sequence[float],
    count_weights: Sequence[float],
    mode: int,
    acc: Sequence[torch.Tensor],
) -> None:
    """Fold a group into the five TIES accumulators ``acc = (S, P, N, Pc, Nc)`` (see module docstring)."""
    S, P, N, Pc, Nc = acc
    flats = [_flat32(x, S.device) for x in xs]
    if _use_numba(S):
        _sign_split_dense(
            typed.List([_np(x) for x in flats]),
            _as_f32(thresholds),
            _as_f32(vote_weights),
            _as_f32(weights),
            _as_f32(count_weights),
            mode,
            *[_np(a) for a in acc],
        )
        return
    for x, t, vg, wg, cg in zip(flats, thresholds, vote_weights, weights, count_weights, strict=True):
        v = torch.where(x.abs() >= t, x, torch.zeros((), device=x.device))
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
    vals = _flat32(values, S.device)
    if _use_numba(S):
        _sign_split_sparse(
            _np(indices.to(torch.int64)),
            _np(vals),
            np.float32(threshold),
            np.float32(vote_weight),
            np.float32(weight),
            np.float32(count_weight),
            mode,
            *[_np(a) for a in acc],
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


def max_abs_dense(xs: Sequence[torch.Tensor], acc: torch.Tensor) -> None:
    """acc_j ← x_gj where |x_gj| > |acc_j|; on equal magnitude the positive value wins (order-free)."""
    flats = [_flat32(x, acc.device) for x in xs]
    if _use_numba(acc):
        _max_abs_dense(typed.List([_np(x) for x in flats]), _np(acc))
        return
    for x in flats:
        take = (x.abs() > acc.abs()) | ((x.abs() == acc.abs()) & (x > acc))
        torch.where(take, x, acc, out=acc)


def max_abs_sparse(indices: torch.Tensor, values: torch.Tensor, acc: torch.Tensor) -> None:
    """Sparse twin of :func:`max_abs_dense` for one client."""
    vals = _flat32(values, acc.device)
    if _use_numba(acc):
        _max_abs_sparse(_np(indices.to(torch.int64)), _np(vals), _np(acc))
        return
    idx = indices.to(device=acc.device, dtype=torch.int64)
    cur = acc[idx]
    take = (vals.abs() > cur.abs()) | ((vals.abs() == cur.abs()) & (vals > cur))
    acc[idx] = torch.where(take, vals, cur)


def topk_threshold(x: torch.Tensor, k: int) -> tuple[float, bool]:
    """The k-th largest |x| and whether ``|x| ≥ threshold`` selects exactly k entries.

    The selection is inexact only when several entries tie in magnitude at the threshold; callers
    then use :func:`trim_topk`, which breaks the tie by position. CPU fp32 path: estimate the quantile
    from a strided sample, then count and gather only the values in a band around the estimate (two
    passes over x instead of a full selection); if the band misses, fall back to ``torch.kthvalue``.
    ``k ≤ 0`` gives +inf (keep nothing) and ``k ≥ numel`` gives 0 (keep everything).
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if k <= 0:
        return float("inf"), True
    if k >= n:
        return 0.0, True
    if _use_numba(flat) and n >= 1 << 16:
        a = _np(flat.contiguous())
        sample = np.sort(np.abs(a[:: max(1, n // 65536)]))
        m = sample.shape[0]
        q = 1.0 - k / n  # the threshold sits at this quantile of |x|
        margin = int(4 * np.sqrt(m * q * (1 - q))) + 32
        pos = int(q * m)
        lo = sample[pos - margin] if pos - margin > 0 else np.float32(0.0)
        hi = sample[pos + margin] if pos + margin < m else np.float32(np.inf)
        above, band = _count_band(a, np.float32(lo), np.float32(hi))
        if above < k <= above + band:
            buf = np.empty(band, dtype=np.float32)
            _gather_band(a, np.float32(lo), np.float32(hi), buf)
            rank = k - above  # the rank-th largest inside the band
            thr = np.partition(buf, band - rank)[band - rank]
            return float(thr), int(above + np.count_nonzero(buf >= thr)) == k
    mag = flat.abs().float()
    thr_t = mag.kthvalue(n - k + 1).values
    return float(thr_t), int((mag >= thr_t).sum()) == k


def trim_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but its k largest-magnitude entries set to zero; ties at the threshold are broken
    by flat position (earlier entries are kept), so exactly k entries survive."""
    thr, exact = topk_threshold(x, k)
    flat = x.reshape(-1)
    mag = flat.abs()
    keep = mag >= thr
    if not exact:
        above = mag > thr
        tied = torch.nonzero(mag == thr).reshape(-1)
        keep = above.clone()
        keep[tied[: k - int(above.sum())]] = True
    return torch.where(keep, flat, torch.zeros((), dtype=x.dtype, device=x.device)).reshape(x.shape)
