"""Sparsification stage: which entries of a delta are sent.

- **top-k** (magnitude): keep the k = ⌈density·n⌉ entries of largest |x|, per tensor or with one
  threshold over all tensors ("global"). Exact: the kept set is the k largest magnitudes, ties at the
  threshold broken by (tensor order, flat index). Error: ‖x − x̂‖² = Σ of the dropped x_i², the
  smallest possible for k entries (Aji & Heafield 2017; Stich et al. 2018 with error feedback).
  Selection is an exact two-level radix select on the IEEE-754 bit patterns of |x| (monotonic for
  non-negative floats): a 16-bit histogram pass, a 15-bit histogram pass restricted to the boundary
  bin, then one pass that emits the indices in increasing order — O(n), no sort. Large inputs first
  take a filter: a fixed strided sample of 2^16 magnitudes gives a lower bound L that at least
  k entries reach (with a margin of 6 standard deviations of the sample count; L is the sample's
  order statistic, found by a three-digit radix select); one pass keeps the positions with
  |x| ≥ L (≈ 1.05·k of them, in order) with their signed bit patterns — the carried values — and
  the high histogram, comparing 64 entries at a time into a bit mask and visiting only its set
  bits; the radix select then runs on the survivors only. Every entry of the top k, and every
  entry tied with the k-th, is ≥ L, so the selected set — ties included — is the one the full
  radix select returns; when fewer than k entries reach L (or more than the buffer holds) the full
  select runs instead. The filter changes speed only, never output. Small inputs (fewer than
  2^16 entries in all, e.g. a small model's biases and layers) skip the 2^16- and 2^15-bin
  histograms, whose zeroing and scans would cost more than the entries: the k-th largest magnitude
  is found by the same three-digit radix select over every entry, and the same emitting pass
  writes the indices above it and the first ties — the same set again.
- **random-k** (DARE, Yu et al. 2024, "Language Models are Super Mario"): entry i is kept iff
  splitmix64(seed + i) >> 11 < keep_threshold, keep_threshold = round(density · 2^53), i.e. with
  probability density, independently. The seed is sent instead of the indices; with rescaling the kept
  values are multiplied by 1/density = 1/(1−p) so E[x̂] = x. splitmix64 (Steele et al. 2014) is
  defined here, bit for bit, so a decoder of any later version regenerates the same positions.
- **none**: every entry, lossless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from fedmerge.codec._bitops import trailing_zeros
from fedmerge.errors import CodecError
from fedmerge.seeds import splitmix64

_HI_BINS = 1 << 16
_LO_BINS = 1 << 15
_INF_BITS = np.uint32(0x7F800000)
RANDOMK_ONE = 1 << 53
"""keep_threshold meaning 'keep every entry'."""


@dataclass(frozen=True)
class StageProperties:
    """What a stage guarantees: lossless, or the error bound it keeps (as a formula)."""

    lossless: bool
    bound: str


PROPERTIES: dict[str, StageProperties] = {
    "none": StageProperties(True, "x̂ = x"),
    "topk": StageProperties(
        False, "x̂_i = x_i on the k largest |x_i|, 0 elsewhere; ‖x − x̂‖² = Σ_dropped x_i² (minimal)"
    ),
    "randomk": StageProperties(
        False, "x̂_i = x_i/density on kept i (rescale) else 0; E[x̂] = x; kept positions regenerated from seed"
    ),
}


# ---------------------------------------------------------------------------------------------- top-k


@numba.njit(cache=True, nogil=True)
def _hist_high(bits: np.ndarray, hist: np.ndarray) -> int:
    """Add the histogram of the top 16 of the 31 magnitude bits to ``hist``; return the non-finite count."""
    nonfinite = 0
    for i in range(bits.size):
        b = bits[i] & 0x7FFFFFFF
        if b >= 0x7F800000:
            nonfinite += 1
        hist[b >> 15] += 1
    return nonfinite


@numba.njit(cache=True, nogil=True)
def _hist_low(bits: np.ndarray, high_bin: int, hist: np.ndarray) -> int:
    """Add the histogram of the low 15 bits inside ``high_bin``; return the count in bins >= high_bin."""
    at_least = 0
    for i in range(bits.size):
        b = bits[i] & 0x7FFFFFFF
        hb = b >> 15
        if hb >= high_bin:
            at_least += 1
            if hb == high_bin:
                hist[b & 0x7FFF] += 1
    return at_least


@numba.njit(cache=True, nogil=True)
def _emit(bits: np.ndarray, threshold: int, ties: int, out: np.ndarray) -> tuple[int, int]:
    """Write, in increasing order, the indices with magnitude bits > threshold plus the first ``ties``
    equal to it; return (count written, ties used)."""
    j = 0
    used = 0
    for i in range(bits.size):
        b = bits[i] & 0x7FFFFFFF
        if b > threshold:
            out[j] = i
            j += 1
        elif b == threshold and used < ties:
            out[j] = i
            j += 1
            used += 1
    return j, used


@numba.njit(cache=True, nogil=True)
def _gather_sample(bits: np.ndarray, first: int, stride: int, out: np.ndarray) -> None:
    """out[j] = |bits[first + j·stride]| as magnitude bits, for every j of ``out``."""
    for j in range(out.size):
        out[j] = bits[first + j * stride] & 0x7FFFFFFF


@numba.njit(cache=True, nogil=True)
def _kth_largest(values: np.ndarray, rank: int) -> int:
    """The ``rank``-th largest (1 ≤ rank ≤ size) of ``values`` (uint32 below 2^31): three radix
    passes over bits 30–20, 19–10 and 9–0, each narrowing to the digit that holds it."""
    prefix = np.int64(0)
    known = np.int64(0)
    remaining = rank
    for level in range(3):
        shift = 20 - 10 * level
        bins = 2048 if level == 0 else 1024
        hist = np.zeros(bins, dtype=np.int64)
        for i in range(values.size):
            v = np.int64(values[i])
            if (v & known) == prefix:
                hist[(v >> shift) & (bins - 1)] += 1
        digit = bins - 1
        above = 0
        while digit > 0 and above + hist[digit] < remaining:
            above += hist[digit]
            digit -= 1
        remaining -= above
        prefix |= np.int64(digit) << shift
        known |= np.int64(bins - 1) << shift
    return int(prefix)


@numba.njit(cache=True, nogil=True)
def _filter_at_least(
    bits: np.ndarray, lower: int, out_idx: np.ndarray, out_raw: np.ndarray, start: int, hist: np.ndarray
) -> tuple[int, int]:
    """Append (i, bits_i) for every i with magnitude bits ≥ ``lower`` at ``start`` of the outputs, in
    increasing i, and add the top 16 magnitude bits of each to ``hist``; stores stop at the end of
    the outputs while the count goes on. Return (start + count, largest magnitude bits seen).

    Blocks of 64 entries are compared without branches into a 64-bit mask whose set bits are then
    visited lowest first, so the cost follows the survivors rather than every entry."""
    n = bits.size
    cap = out_idx.size
    low = np.uint32(lower)
    mag = np.uint32(0x7FFFFFFF)
    top = np.uint32(0)
    j = start
    blocks = n // 64
    for blk in range(blocks):
        base = blk * 64
        m = np.uint64(0)
        for t in range(64):
            b = bits[base + t] & mag
            top = max(top, b)
            m |= np.uint64(b >= low) << np.uint64(t)
        while m != np.uint64(0):
            i = base + np.int64(trailing_zeros(m))
            raw = bits[i]
            if j < cap:
                out_idx[j] = i
                out_raw[j] = raw
                hist[(raw & mag) >> 15] += 1
            j += 1
            m &= m - np.uint64(1)
    for p in range(blocks * 64, n):
        raw = bits[p]
        b = raw & mag
        top = max(top, b)
        if b >= low:
            if j < cap:
                out_idx[j] = p
                out_raw[j] = raw
                hist[b >> 15] += 1
            j += 1
    return j, int(np.int64(top))


@numba.njit(cache=True, nogil=True)
def _hist_low_raw(raw: np.ndarray, high_bin: int, hist: np.ndarray) -> None:
    """Histogram of the low 15 magnitude bits of the signed bit patterns ``raw`` inside ``high_bin``.

    Membership is tested without branches 64 entries at a time; only members are visited."""
    hb = np.uint32(high_bin)
    mag = np.uint32(0x7FFFFFFF)
    n = np.uint64(raw.size)
    blocks = n // np.uint64(64)
    for blk in range(blocks):
        base = blk * np.uint64(64)
        m = np.uint64(0)
        for t in range(np.uint64(64)):
            m |= np.uint64(((raw[base + t] & mag) >> np.uint32(15)) == hb) << t
        while m != np.uint64(0):
            hist[raw[base + trailing_zeros(m)] & np.uint32(0x7FFF)] += 1
            m &= m - np.uint64(1)
    for i in range(blocks * np.uint64(64), n):
        b = raw[i] & mag
        if (b >> np.uint32(15)) == hb:
            hist[b & np.uint32(0x7FFF)] += 1


@numba.njit(cache=True, nogil=True)
def _emit_at_least(
    idx: np.ndarray, raw: np.ndarray, threshold: int, out_idx: np.ndarray, out_raw: np.ndarray
) -> int:
    """:func:`_emit_filtered` when every entry tied with the threshold is kept: the pairs with
    magnitude bits ≥ ``threshold``; no count of ties runs through the loop. Return the count."""
    j = np.uint64(0)
    t = np.uint32(threshold)
    for c in range(np.uint64(idx.size)):
        r = raw[c]
        out_idx[j] = idx[c]
        out_raw[j] = r
        j += np.uint64((r & np.uint32(0x7FFFFFFF)) >= t)
    return int(np.int64(j))


@numba.njit(cache=True, nogil=True)
def _emit_filtered(
    idx: np.ndarray, raw: np.ndarray, threshold: int, ties: int, out_idx: np.ndarray, out_raw: np.ndarray
) -> tuple[int, int]:
    """Like :func:`_emit` over filtered (index, signed bits) pairs, keeping the bits (= the values).

    Branch-free: every pair is stored at the write position, which advances only for a kept one
    (the outputs need as many slots as there are pairs)."""
    j = 0
    used = 0
    t = np.uint32(threshold)
    for c in range(idx.size):
        r = raw[c]
        b = r & np.uint32(0x7FFFFFFF)
        eq = b == t
        take = (b > t) | (eq & (used < ties))
        out_idx[j] = idx[c]
        out_raw[j] = r
        j += take
        used += eq & take
    return j, used


@numba.njit(cache=True, nogil=True)
def _boundary_scan(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(largest bin b with Σ hist[b:] ≥ k, Σ hist[b+1:]), scanning down from the top bin."""
    above = 0
    b = hist.size - 1
    while b > 0 and above + hist[b] < k:
        above += hist[b]
        b -= 1
    return b, above


def _as_bits(flat: torch.Tensor) -> np.ndarray:
    return flat.numpy().view(np.uint32)


def topk_count(numel: int, density: float) -> int:
    """k = ⌈density · numel⌉ (at least 1 for a non-empty tensor, at most numel)."""
    return min(numel, max(1 if numel else 0, math.ceil(density * numel - 1e-9)))


SMALL_MAX_NUMEL = 1 << 16
"""Below this many entries the k-th largest magnitude is found by the three-digit radix select."""
FILTER_MIN_NUMEL = 1 << 18
"""Below this many entries the full radix select runs directly (the filter would not pay off)."""
_SAMPLE = 1 << 16


def topk_indices(flats: Sequence[torch.Tensor], k: int, names: Sequence[str]) -> list[torch.Tensor]:
    """Flat int64 indices (sorted) of the k largest |x| over all ``flats`` together (1-D contiguous fp32).

    Pass one tensor for per-tensor top-k, several for global top-k. Raises :class:`CodecError` naming
    the first tensor that holds a NaN or infinity.
    """
    return [idx for idx, _ in topk_select(flats, k, names)]


def topk_select(
    flats: Sequence[torch.Tensor], k: int, names: Sequence[str]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(sorted int64 indices, their fp32 values) per tensor: the k largest |x| over all ``flats``.

    The selection of :func:`topk_indices` (same set, same tie-breaking), with the carried values
    gathered in the same pass. Raises :class:`CodecError` naming the first non-finite tensor.
    """
    total = sum(int(f.numel()) for f in flats)
    if 0 < k < total and total >= FILTER_MIN_NUMEL:
        picked = _topk_filtered(flats, k, names, total)
        if picked is not None:
            return picked
    return [(idx, f.index_select(0, idx)) for f, idx in zip(flats, _topk_full(flats, k, names), strict=True)]


def _topk_filtered(
    flats: Sequence[torch.Tensor], k: int, names: Sequence[str], total: int
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Sample → lower bound → filter → exact select on the survivors; None when the bound missed."""
    bits = [_as_bits(f) for f in flats]
    stride = total // _SAMPLE  # ≥ 4 since total ≥ FILTER_MIN_NUMEL; an odd stride breaks row alignment
    stride -= 1 - stride % 2
    offset = (total - stride * _SAMPLE) // 2  # sample j sits at position offset + j·stride
    sample = np.empty(_SAMPLE, dtype=np.uint32)
    start = 0
    for b in bits:  # the samples inside [start, start + size): j from ⌈(start − offset)/stride⌉ on
        lo = min(_SAMPLE, max(0, -((offset - start) // stride)))
        hi = min(_SAMPLE, max(0, -((offset - start - b.size) // stride)))
        if hi > lo:
            _gather_sample(b, offset + lo * stride - start, stride, sample[lo:hi])
        start += b.size
    q = k / total
    mean = q * _SAMPLE
    rank = math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - q)) + 8)  # sample entries at or above L
    if rank >= _SAMPLE:
        return None
    lower = _kth_largest(sample, rank)
    capacity = int(total * (rank + 6.0 * math.sqrt(rank) + 8) / _SAMPLE) + 1024
    cand_idx = np.empty(capacity, dtype=np.int64)
    cand_raw = np.empty(capacity, dtype=np.uint32)  # signed bit patterns: the values themselves
    hist = np.zeros(_HI_BINS, dtype=np.int64)
    ends = [0]
    for b, name in zip(bits, names, strict=True):
        end, top = _filter_at_least(b, lower, cand_idx, cand_raw, ends[-1], hist)
        if top >= _INF_BITS:
            raise CodecError(f"tensor {name!r} holds NaN or infinite values; a delta must be finite")
        ends.append(end)
    if ends[-1] > capacity or ends[-1] < k:
        return None  # the buffer overflowed or the bound was too high: rare, the full select decides
    high_bin, above = _boundary(hist, k)
    low = np.zeros(_LO_BINS, dtype=np.int64)
    _hist_low_raw(cand_raw[: ends[-1]], high_bin, low)
    low_bin, above_low = _boundary(low, k - above)
    threshold = (high_bin << 15) | low_bin
    ties = k - above - above_low
    every_tie = ties == int(low[low_bin])  # the usual case: no entry equal to the k-th is dropped
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in range(len(flats)):
        lo, hi = ends[t], ends[t + 1]
        idx = np.empty(hi - lo, dtype=np.int64)
        raw = np.empty(hi - lo, dtype=np.uint32)
        if every_tie:
            count = _emit_at_least(cand_idx[lo:hi], cand_raw[lo:hi], threshold, idx, raw)
        else:
            count, used = _emit_filtered(cand_idx[lo:hi], cand_raw[lo:hi], threshold, ties, idx, raw)
            ties -= used
        out.append((torch.from_numpy(idx[:count]), torch.from_numpy(raw[:count].view(np.float32))))
    return out


def _topk_full(flats: Sequence[torch.Tensor], k: int, names: Sequence[str]) -> list[torch.Tensor]:
    """The exact two-level radix select over every entry (see the module docstring)."""
    total = sum(int(f.numel()) for f in flats)
    if k <= 0:
        return [torch.zeros(0, dtype=torch.int64) for _ in flats]
    if k >= total:
        return [torch.arange(int(f.numel()), dtype=torch.int64) for f in flats]
    bits = [_as_bits(f) for f in flats]
    if total < SMALL_MAX_NUMEL:
        return _topk_small(bits, k, names)
    hist = np.zeros(_HI_BINS, dtype=np.int64)
    for name, b in zip(names, bits, strict=True):
        if _hist_high(b, hist):
            raise CodecError(f"tensor {name!r} holds NaN or infinite values; a delta must be finite")
    high_bin, above = _boundary(hist, k)
    low = np.zeros(_LO_BINS, dtype=np.int64)
    capacity = [_hist_low(b, high_bin, low) for b in bits]
    low_bin, above_low = _boundary(low, k - above)
    threshold = (high_bin << 15) | low_bin
    ties = k - above - above_low
    out: list[torch.Tensor] = []
    for b, cap in zip(bits, capacity, strict=True):
        buf = np.empty(cap, dtype=np.int64)
        count, used = _emit(b, threshold, ties, buf)
        ties -= used
        out.append(torch.from_numpy(buf[:count]))
    return out


def _topk_small(bits: Sequence[np.ndarray], k: int, names: Sequence[str]) -> list[torch.Tensor]:
    """:func:`_topk_full`'s selection for few entries (1 ≤ k < their number): threshold = the k-th
    largest magnitude of them all (:func:`_kth_largest`), then the same emitting pass."""
    magnitudes = np.concatenate(bits) & np.uint32(0x7FFFFFFF)
    if int(magnitudes.max()) >= _INF_BITS:
        name = next(
            n for n, b in zip(names, bits, strict=True) if b.size and (b & 0x7FFFFFFF).max() >= _INF_BITS
        )
        raise CodecError(f"tensor {name!r} holds NaN or infinite values; a delta must be finite")
    threshold = _kth_largest(magnitudes, k)
    ties = k - int(np.count_nonzero(magnitudes > threshold))
    out: list[torch.Tensor] = []
    for b in bits:
        buf = np.empty(b.size, dtype=np.int64)
        count, used = _emit(b, threshold, ties, buf)
        ties -= used
        out.append(torch.from_numpy(buf[:count]))
    return out


def _boundary(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry and the number of entries in higher bins (1 ≤ k ≤ Σ hist)."""
    bin_index, above = _boundary_scan(hist, k)
    return int(bin_index), int(above)


# ------------------------------------------------------------------------------------------- random-k


@numba.njit(cache=True, nogil=True)
def _randomk_fill(seed: np.uint64, threshold: np.uint64, numel: int, out: np.ndarray) -> int:
    """Write kept positions into ``out`` (never past its end); return how many positions are kept."""
    j = 0
    for i in range(numel):
        if (splitmix64(seed + np.uint64(i)) >> np.uint64(11)) < threshold:
            if j < out.size:
                out[j] = i
            j += 1
    return j


def keep_threshold(density: float) -> int:
    """round(density · 2^53): position i is kept iff splitmix64(seed + i) >> 11 is below it."""
    return min(RANDOMK_ONE, max(0, round(density * RANDOMK_ONE)))


def randomk_indices(
    seed: int, threshold: int, numel: int, expected: int | None = None
) -> tuple[torch.Tensor, int]:
    """Kept positions for (seed, threshold) and their true count.

    With ``expected`` (a decoder's declared nnz) at most that many are materialised: memory stays
    O(expected), and a count that differs from it is returned for the caller to refuse.
    """
    s, t = np.uint64(seed), np.uint64(threshold)
    if expected is None:
        count = _randomk_fill(s, t, numel, np.empty(0, dtype=np.int64))
        buf = np.empty(count, dtype=np.int64)
        _randomk_fill(s, t, numel, buf)
        return torch.from_numpy(buf), count
    buf = np.empty(expected, dtype=np.int64)
    count = _randomk_fill(s, t, numel, buf)
    return torch.from_numpy(buf), count
