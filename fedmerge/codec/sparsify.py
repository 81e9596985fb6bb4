"""Sparsification stage: which entries of a delta are sent.

- **top-k** (magnitude): keep the k = ⌈density·n⌉ entries of largest |x|, per tensor or with one
  threshold over all tensors ("global"). Exact: the kept set is the k largest magnitudes, ties at the
  threshold broken by (tensor order, flat index). Error: ‖x − x̂‖² = Σ of the dropped x_i², the
  smallest possible for k entries (Aji & Heafield 2017; Stich et al. 2018 with error feedback).
  Selection is an exact two-level radix select on the IEEE-754 bit patterns of |x| (monotonic for
  non-negative floats): a 16-bit histogram pass, a 15-bit histogram pass restricted to the boundary
  bin, then one pass that emits the indices in increasing order — O(n), no sort.
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

from fedmerge.errors import CodecError
from fedmerge.seeds import splitmix64

_HI_BINS = 1 << 16
_LO_BINS = 1 << 15
_ABS_MASK = np.uint32(0x7FFFFFFF)
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


def _as_bits(flat: torch.Tensor) -> np.ndarray:
    return flat.numpy().view(np.uint32)


def topk_count(numel: int, density: float) -> int:
    """k = ⌈density · numel⌉ (at least 1 for a non-empty tensor, at most numel)."""
    return min(numel, max(1 if numel else 0, math.ceil(density * numel - 1e-9)))


def topk_indices(flats: Sequence[torch.Tensor], k: int, names: Sequence[str]) -> list[torch.Tensor]:
    """Flat int64 indices (sorted) of the k largest |x| over all ``flats`` together (1-D contiguous fp32).

    Pass one tensor for per-tensor top-k, several for global top-k. Raises :class:`CodecError` naming
    the first tensor that holds a NaN or infinity.
    """
    total = sum(int(f.numel()) for f in flats)
    if k <= 0:
        return [torch.zeros(0, dtype=torch.int64) for _ in flats]
    if k >= total:
        return [torch.arange(int(f.numel()), dtype=torch.int64) for f in flats]
    bits = [_as_bits(f) for f in flats]
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


def _boundary(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry and the number of entries in higher bins."""
    from_top = np.cumsum(hist[::-1])
    pos = int(np.searchsorted(from_top, k))  # first position where the cumulative count reaches k
    bin_index = hist.size - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    return bin_index, above


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
