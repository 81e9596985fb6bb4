"""Exact top-k selection by magnitude, as a threshold and a tie cut (TIES trimming, top-k
sparsification): entry j is kept iff |x_j| > t, or |x_j| == t and j < c.

On the CPU (fp32, numba) the threshold is found without a full sort: the quantile is estimated from a
strided sample (:func:`_sample`, :func:`_band_limits`), then only the values in a band around the
estimate are counted, gathered and partitioned; a group of tensors is selected one tensor per
thread. If the band misses, ``torch.kthvalue`` decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.aggregators.kernel_runtime import HAVE_NUMBA, njit, np_view, prange, typed, use_numba


def _sample(a: np.ndarray) -> np.ndarray:
    """|a| at a stride giving at most ~65 536 values (the quantile estimate's sample)."""
    return np.abs(a[:: max(1, a.shape[0] // 65536)])


if HAVE_NUMBA:
    _sample_jit = njit(cache=True)(_sample)

    @njit(cache=True)
    def _band_limits(sample, n, k):
        """(lo, hi): a band of |a| values around the top-k threshold of the n values of ``a``, from
        ``sample``, the sorted :func:`_sample` of |a| (±4 standard deviations of the sample quantile,
        plus 32 values)."""
        m = sample.shape[0]
        q = 1.0 - k / n  # the threshold sits at this quantile of |x|
        margin = int(4 * np.sqrt(m * q * (1 - q))) + 32
        pos = int(q * m)
        lo = sample[pos - margin] if pos - margin > 0 else np.float32(0.0)
        hi = sample[pos + margin] if pos + margin < m else np.float32(np.inf)
        return np.float32(lo), np.float32(hi)

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

    @njit(cache=True)
    def _select_serial(a, k):
        """(threshold, tie cut) of the top-k |a| on one thread; tie cut −1 means the band missed."""
        n = a.shape[0]
        sample = _sample_jit(a)
        sample.sort()
        lo, hi = _band_limits(sample, n, k)
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
    if use_numba(flat) and n >= 1 << 16:
        a = np_view(flat.contiguous())
        lo, hi = _band_limits(np.sort(_sample(a)), n, k)  # numpy's sort: SIMD, faster than numba's
        above, band = _count_band(a, lo, hi)
        if above < k <= above + band:
            buf = np.empty(band, dtype=np.float32)
            _gather_band(a, lo, hi, buf)
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
        use_numba(f) and f.numel() >= 1 << 16 and 0 < k < f.numel() for f, k in zip(flats, ks, strict=True)
    ):
        return [topk_threshold(x, k) for x, k in zip(xs, ks, strict=True)]
    thr = np.empty(len(flats), dtype=np.float32)
    cut = np.empty(len(flats), dtype=np.int64)
    _group_thresholds(
        typed.List([np_view(f.contiguous()) for f in flats]), np.asarray(ks, np.int64), thr, cut
    )
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


__all__ = ["keep_mask", "topk_threshold", "topk_thresholds", "trim_topk"]
