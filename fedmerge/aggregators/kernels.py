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

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedmerge.seeds import SPLITMIX_GAMMA, SPLITMIX_MIX1, SPLITMIX_MIX2

try:  # numba is a declared dependency; the torch path keeps GPUs (and odd platforms) working
    from numba import njit, prange, typed

    from fedmerge.seeds import splitmix_uniform

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

BLOCK = 4096  # coordinates per block: 5 fp32 accumulators × 16 KiB stay in L1/L2 while G inputs stream
# Coordinates per block of the grouped sparse fold: 5 fp32 accumulators × 64 KiB stay in L2 while the
# group's non-zeros in that range (a few thousand per client at density 0.1) stream through.
SPARSE_BLOCK = 1 << 14
VOTE_TOTAL = 0
VOTE_FREQUENCY = 1
# Below this many coordinates a fold runs on the calling thread. Waking a thread team costs more
# than ~10^5 element updates, and on a busy machine (a simulation's clients on every core) OpenMP's
# spinning barriers make a parallel fold of a small tensor 100–1000× slower than a serial one.
PARALLEL_MIN_ELEMENTS = 1 << 17


class SizedKernel:
    """A numba kernel compiled twice from one function: parallel (``prange`` splits the loop over
    threads) and serial (``prange`` acts as ``range``). ``kernel.on(n)`` picks by problem size."""

    def __init__(self, fn: Callable[..., Any], fastmath: bool) -> None:
        flags: Any = set(RESULT_PRESERVING_FASTMATH) if fastmath else False
        self.parallel = njit(parallel=True, cache=True, fastmath=flags)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
        twin.__qualname__ = fn.__qualname__ + "_serial"  # its own on-disk cache entry
        self.serial = njit(cache=True, fastmath=flags)(twin)

    def on(self, n: int) -> Callable[..., Any]:
        return self.parallel if n >= PARALLEL_MIN_ELEMENTS else self.serial


# The only fast-math flags the folds use: they let LLVM drop NaN/inf/signed-zero bookkeeping (inputs are
# validated finite) but never reassociate, contract into FMAs or replace a division by a reciprocal,
# so every kernel returns the bit-exact result of its plain torch twin on every LLVM release.
RESULT_PRESERVING_FASTMATH = frozenset({"nnan", "ninf", "nsz"})


def sized_kernel(fastmath: bool = False) -> Callable[[Callable[..., Any]], SizedKernel]:
    """Decorator: compile a ``prange`` loop as a :class:`SizedKernel` (``fastmath=True`` means
    :data:`RESULT_PRESERVING_FASTMATH`, never LLVM's full ``fast`` set)."""
    return lambda fn: SizedKernel(fn, fastmath)


if HAVE_NUMBA:

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

    @sized_kernel(fastmath=True)
    def _sign_split_sparse(idx, val, t, vg, wg, cg, mode, S, P, N, Pc, Nc):
        n = idx.shape[0]
        nblocks = (n + BLOCK - 1) // BLOCK
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange(nblocks):  # branch-free: the sign of a delta is unpredictable
            for k in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                v = val[k]
                v = v if abs(v) >= t else zero
                j = idx[k]
                pos = one if v > zero else zero
                neg = one if v < zero else zero
                S[j] += vg * (v if mode == VOTE_TOTAL else pos - neg)
                P[j] += wg * v * pos
                N[j] += wg * v * neg
                Pc[j] += cg * pos
                Nc[j] += cg * neg

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
                    v = val[k]
                    v = v if abs(v) >= t else zero
                    j = idx[k]
                    pos = one if v > zero else zero
                    neg = one if v < zero else zero
                    S[j] += vg * (v if mode == VOTE_TOTAL else pos - neg)
                    P[j] += wg * v * pos
                    N[j] += wg * v * neg
                    Pc[j] += cg * pos
                    Nc[j] += cg * neg

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
    def _band_count_block(a, lo, hi, start, stop):
        c = 0
        for j in range(start, stop):
            v = abs(a[j])
            c += 1 if (v >= lo and v <= hi) else 0
        return c

    @njit(cache=True)
    def _band_fill_block(a, lo, hi, start, stop, out, k, end):
        # branch-free append: write every value, advance only on a hit (10× faster than `if hit: write`)
        for j in range(start, stop):
            v = abs(a[j])
            if k < end:
                out[k] = v
            k += 1 if (v >= lo and v <= hi) else 0

    @njit(parallel=True, cache=True)
    def _gather_band(a, lo, hi, out):
        """Write every |a_j| with lo ≤ |a_j| ≤ hi into ``out`` (block counts, prefix sum, parallel fill)."""
        n = a.shape[0]
        nblocks = (n + 65536 - 1) // 65536
        counts = np.zeros(nblocks + 1, np.int64)
        for b in prange(nblocks):
            counts[b + 1] = _band_count_block(a, lo, hi, b * 65536, min(b * 65536 + 65536, n))
        offsets = np.cumsum(counts)
        for b in prange(nblocks):
            _band_fill_block(a, lo, hi, b * 65536, min(b * 65536 + 65536, n), out, offsets[b], offsets[b + 1])
        return offsets[nblocks]

    @njit(cache=True)
    def _tie_cut(a, thr, r):
        """Index just after the r-th entry with |a_j| == thr (0 when r == 0)."""
        if r <= 0:
            return 0
        seen = 0
        for j in range(a.shape[0]):
            if abs(a[j]) == thr:
                seen += 1
                if seen == r:
                    return j + 1
        return a.shape[0]


if HAVE_NUMBA:

    @njit(cache=True)
    def _select_serial(a, k):
        """(threshold, tie cut) of the top-k |a| on one thread; tie cut −1 means the band missed."""
        n = a.shape[0]
        sample = np.abs(a[:: max(1, n // 65536)])
        sample.sort()
        m = sample.shape[0]
        q = 1.0 - k / n
        margin = int(4 * np.sqrt(m * q * (1 - q))) + 32
        pos = int(q * m)
        lo = sample[pos - margin] if pos - margin > 0 else np.float32(0.0)
        hi = sample[pos + margin] if pos + margin < m else np.float32(np.inf)
        above = 0
        band = 0
        for j in range(n):
            v = abs(a[j])
            above += 1 if v > hi else 0
            band += 1 if (v >= lo and v <= hi) else 0
        if not (above < k <= above + band):
            return np.float32(0.0), np.int64(-1)
        buf = np.empty(band + 1, dtype=np.float32)
        kk = 0
        for j in range(n):  # branch-free append (see _band_fill_block)
            v = abs(a[j])
            buf[kk] = v
            kk += 1 if (v >= lo and v <= hi) else 0
        vals = buf[:band]
        rank = k - above
        thr = np.partition(vals, band - rank)[band - rank]
        greater = above
        tied = 0
        for v in vals:
            greater += 1 if v > thr else 0
            tied += 1 if v == thr else 0
        if greater + tied == k:
            return thr, np.int64(n)
        return thr, np.int64(_tie_cut(a, thr, k - greater))

    @njit(parallel=True, cache=True)
    def _group_thresholds(xs, ks, thr, cut):
        for g in prange(len(xs)):  # one client per thread: no cross-thread gather
            t, c = _select_serial(xs[g], ks[g])
            thr[g] = t
            cut[g] = c


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
    if _use_numba(S):
        out = empty(S.numel(), S.device)
        _disjoint_mean.on(S.numel())(_np(S), _np(P), _np(N), _np(Pc), _np(Nc), np.float32(scale), _np(out))
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
    if HAVE_NUMBA and dev.type == "cpu" and not _FORCE_TORCH:
        out = np.empty(n, dtype=np.float64)
        _uniform.on(n)(np.uint64(seed % (1 << 64)), out)
        return torch.from_numpy(out)
    return _splitmix_uniform_torch(seed % (1 << 64), n, dev)


def seeded_bernoulli_scale(x: torch.Tensor, density: float, scale: float, seed: int) -> torch.Tensor:
    """x_j · scale where u_j < density, else 0, with u = :func:`seeded_uniform` (one fused pass)."""
    flat = x.detach().reshape(-1)
    if _use_numba(flat):
        out = empty(flat.numel(), flat.device)
        _bernoulli_scale.on(flat.numel())(
            _np(flat.contiguous()), density, np.float32(scale), np.uint64(seed % (1 << 64)), _np(out)
        )
        return out.reshape(x.shape)
    keep = seeded_uniform(flat.numel(), seed, flat.device) < density
    return torch.where(keep, flat.float() * scale, torch.zeros((), device=flat.device)).reshape(x.shape)


def zeros(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 zero tensor. On the CPU it comes from numpy, which backs large arrays with
    transparent huge pages (5× faster first touch than torch's 4 KiB pages) and callocs them, so
    pages are faulted in by the parallel kernels that first touch them."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(numel, dtype=np.float32))
    return torch.zeros(numel, dtype=torch.float32, device=device)


def empty(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 uninitialised tensor, huge-page backed on the CPU (see :func:`zeros`)."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(numel, dtype=np.float32))
    return torch.empty(numel, dtype=torch.float32, device=device)


_FORCE_TORCH = False


@contextmanager
def torch_path() -> Iterator[None]:
    """Within this block every fold runs its plain torch expressions even on CPU fp32 tensors — the
    code path CUDA tensors (and machines without numba) always take — so the device-generic path
    is testable on a CPU. Not thread-safe: meant for tests and benchmarks."""
    global _FORCE_TORCH
    previous, _FORCE_TORCH = _FORCE_TORCH, True
    try:
        yield
    finally:
        _FORCE_TORCH = previous


def _use_numba(*tensors: torch.Tensor) -> bool:
    return (
        HAVE_NUMBA
        and not _FORCE_TORCH
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    )


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
        kernel = _weighted_sum_dense.on(acc.numel() * len(flats))
        kernel(typed.List([_np(x) for x in flats]), _as_f32(weights), _np(acc))
        return
    for x, w in zip(flats, weights, strict=True):
        acc.add_(x, alpha=float(w))


def weighted_sum_sparse(
    indices: torch.Tensor, values: torch.Tensor, weight: float, acc: torch.Tensor
) -> None:
    """acc[indices] += w · values (indices sorted and unique)."""
    vals = _flat32(values, acc.device)
    if _use_numba(acc):
        kernel = _weighted_sum_sparse.on(vals.numel())
        kernel(_np(indices.to(torch.int64)), _np(vals), np.float32(weight), _np(acc))
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
    flats = [_flat32(x, S.device) for x in xs]
    if _use_numba(S):
        _sign_split_dense.on(S.numel() * len(flats))(
            typed.List([_np(x) for x in flats]),
            _as_f32(thresholds),
            np.asarray(tie_cuts, dtype=np.int64),
            _as_f32(vote_weights),
            _as_f32(weights),
            _as_f32(count_weights),
            mode,
            *[_np(a) for a in acc],
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
    vals = _flat32(values, S.device)
    if _use_numba(S):
        _sign_split_sparse.on(vals.numel())(
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
    if not _use_numba(S) or not indices:
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
        idx, val = _sorted_by_index(_np(idx_t.to(torch.int64).contiguous()), _np(_flat32(val_t, S.device)))
        if idx.shape[0] != val.shape[0]:
            raise ValueError(f"client {g}: {idx.shape[0]} indices but {val.shape[0]} values")
        starts[g] = np.searchsorted(idx, bounds)
        idxs.append(idx)
        vals.append(val)
    _sign_split_sparse_group.on(sum(v.shape[0] for v in vals))(
        typed.List(idxs),
        typed.List(vals),
        starts,
        _as_f32(thresholds),
        _as_f32(vote_weights),
        _as_f32(weights),
        _as_f32(count_weights),
        mode,
        *[_np(a) for a in acc],
    )


def max_abs_dense(xs: Sequence[torch.Tensor], acc: torch.Tensor) -> None:
    """acc_j ← x_gj where |x_gj| > |acc_j|; on equal magnitude the positive value wins (order-free)."""
    flats = [_flat32(x, acc.device) for x in xs]
    if _use_numba(acc):
        _max_abs_dense.on(acc.numel() * len(flats))(typed.List([_np(x) for x in flats]), _np(acc))
        return
    for x in flats:
        take = (x.abs() > acc.abs()) | ((x.abs() == acc.abs()) & (x > acc))
        torch.where(take, x, acc, out=acc)


def max_abs_sparse(indices: torch.Tensor, values: torch.Tensor, acc: torch.Tensor) -> None:
    """Sparse twin of :func:`max_abs_dense` for one client."""
    vals = _flat32(values, acc.device)
    if _use_numba(acc):
        _max_abs_sparse.on(vals.numel())(_np(indices.to(torch.int64)), _np(vals), _np(acc))
        return
    idx = indices.to(device=acc.device, dtype=torch.int64)
    cur = acc[idx]
    take = (vals.abs() > cur.abs()) | ((vals.abs() == cur.abs()) & (vals > cur))
    acc[idx] = torch.where(take, vals, cur)


def keep_mask(flat: torch.Tensor, threshold: float, tie_cut: int) -> torch.Tensor:
    """|x_j| > t, or |x_j| == t and j < tie_cut: the top-k selection :func:`topk_threshold` describes."""
    mag = flat.abs()
    tied = (mag == threshold) & (torch.arange(flat.numel(), device=flat.device) < tie_cut)
    return (mag > threshold) | tied


def topk_threshold(x: torch.Tensor, k: int) -> tuple[float, int]:
    """Describe the top-k entries of |x| as (threshold t, tie cut c), exactly.

    Entry j is selected iff |x_j| > t, or |x_j| == t and j < c: entries tied in magnitude at the
    threshold are taken in flat order until exactly k are selected (c = numel when all ties fit).
    CPU fp32 path: estimate the quantile from a strided sample, then count and gather only the
    values in a band around the estimate (two parallel passes instead of a full selection); if the
    band misses, fall back to ``torch.kthvalue``. ``k ≤ 0`` selects nothing, ``k ≥ numel`` everything.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if k <= 0:
        return float("inf"), 0
    if k >= n:
        return 0.0, n
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
            greater = int(above + np.count_nonzero(buf > thr))
            tied = int(np.count_nonzero(buf == thr))
            cut = n if greater + tied == k else int(_tie_cut(a, thr, k - greater))
            return float(thr), cut
    mag = flat.abs().float()
    thr_t = mag.kthvalue(n - k + 1).values
    greater = int((mag > thr_t).sum())
    tied_idx = torch.nonzero(mag == thr_t).reshape(-1)
    if greater + tied_idx.numel() == k:
        return float(thr_t), n
    return float(thr_t), int(tied_idx[k - greater - 1]) + 1


def topk_thresholds(xs: Sequence[torch.Tensor], ks: Sequence[int]) -> list[tuple[float, int]]:
    """:func:`topk_threshold` for a group of tensors; on the CPU each thread selects for one tensor
    (a selection is a few dependent passes that scale poorly within one tensor, well across tensors)."""
    flats = [x.detach().reshape(-1) for x in xs]
    if len(flats) < 2 or not all(
        _use_numba(f) and f.numel() >= 1 << 16 and 0 < k < f.numel() for f, k in zip(flats, ks, strict=True)
    ):
        return [topk_threshold(x, k) for x, k in zip(xs, ks, strict=True)]
    thr = np.empty(len(flats), dtype=np.float32)
    cut = np.empty(len(flats), dtype=np.int64)
    _group_thresholds(typed.List([_np(f.contiguous()) for f in flats]), np.asarray(ks, np.int64), thr, cut)
    return [
        (float(t), int(c)) if c >= 0 else topk_threshold(x, k)  # band missed: the general path
        for t, c, x, k in zip(thr, cut, xs, ks, strict=True)
    ]


def trim_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but its k largest-magnitude entries set to zero; ties at the threshold are broken
    by flat position (earlier entries are kept), so exactly k entries survive."""
    thr, cut = topk_threshold(x, k)
    flat = x.reshape(-1)
    keep = keep_mask(flat, thr, cut)
    return torch.where(keep, flat, torch.zeros((), dtype=x.dtype, device=x.device)).reshape(x.shape)
