"""Every numba kernel of the codec against a plain NumPy / Python reference of its contract, on seeded
random inputs and the edge cases (ties, zeros, −0.0, tiny and odd sizes, density 1, corrupt payloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.codec import (
    CodecConfig,
    PackageMeta,
    encode_package,
    error_feedback,
    index_coding,
    quantize,
    sparsify,
)
from fedmerge.errors import CodecError

MAG = np.uint32(0x7FFFFFFF)


def magnitudes(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32) & MAG


def sample_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    heavy = (rng.standard_t(3, 20_011) * 1e-3).astype(np.float32)
    ties = rng.integers(-4, 5, 10_007).astype(np.float32)
    signed_zeros = np.where(rng.random(4_099) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    signed_zeros[::97] = 1.5
    subnormal = (rng.standard_normal(3_001) * 1e-41).astype(np.float32)
    return {
        "heavy": heavy,
        "ties": ties,
        "zeros": np.zeros(5_000, dtype=np.float32),
        "signed_zeros": signed_zeros,
        "subnormal": subnormal,
        "tiny": np.array([0.25, -3.0, 0.25], dtype=np.float32),
        "one": np.array([-1.0], dtype=np.float32),
        "block_of_64": heavy[:64].copy(),
        "block_of_65": heavy[:65].copy(),
    }


# ---------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("name", sorted(sample_inputs()))
def test_kth_largest_is_the_partition_order_statistic(name: str) -> None:
    values = magnitudes(sample_inputs()[name])
    for rank in sorted({1, 2, values.size // 3 + 1, values.size // 2 + 1, values.size}):
        if not 1 <= rank <= values.size:
            continue
        want = np.partition(values, values.size - rank)[values.size - rank]
        assert sparsify._kth_largest(values, rank) == int(want)


def filter_reference(x: np.ndarray, lower: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    mags = magnitudes(x)
    keep = np.flatnonzero(mags >= lower)
    hist = np.bincount(mags[keep] >> 15, minlength=1 << 16).astype(np.int64)
    return keep, x.view(np.uint32)[keep], hist, int(mags.max(initial=0))


@pytest.mark.parametrize("name", sorted(sample_inputs()))
@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9, 1.0])
def test_filter_keeps_every_entry_at_or_above_the_bound_in_order(name: str, quantile: float) -> None:
    x = sample_inputs()[name]
    lower = int(np.quantile(magnitudes(x), quantile, method="lower"))
    keep, raw, hist, top = filter_reference(x, lower)
    out_idx = np.full(x.size + 3, -1, dtype=np.int64)
    out_raw = np.zeros(x.size + 3, dtype=np.uint32)
    got_hist = np.zeros(1 << 16, dtype=np.int64)
    end, got_top = sparsify._filter_at_least(x.view(np.uint32), lower, out_idx, out_raw, 3, got_hist)
    assert (end, got_top) == (3 + keep.size, top)
    assert np.array_equal(out_idx[3:end], keep) and np.array_equal(out_raw[3:end], raw)
    assert np.array_equal(got_hist, hist)


def test_filter_stops_storing_at_the_end_of_its_buffer_but_keeps_counting() -> None:
    x = sample_inputs()["heavy"]
    keep, raw, _, _ = filter_reference(x, 0)
    out_idx = np.full(100, -1, dtype=np.int64)
    out_raw = np.zeros(100, dtype=np.uint32)
    end, _ = sparsify._filter_at_least(
        x.view(np.uint32), 0, out_idx, out_raw, 10, np.zeros(1 << 16, np.int64)
    )
    assert end == 10 + x.size
    assert np.array_equal(out_idx[10:], keep[:90]) and np.array_equal(out_raw[10:], raw[:90])
    assert (out_idx[:10] == -1).all()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_filter_reports_non_finite_entries_anywhere(bad: float) -> None:
    for position in (0, 63, 64, 20_010):
        x = sample_inputs()["heavy"].copy()
        x[position] = bad
        _, top = sparsify._filter_at_least(
            x.view(np.uint32),
            1 << 30,
            np.empty(8, np.int64),
            np.empty(8, np.uint32),
            0,
            np.zeros(1 << 16, np.int64),
        )
        assert top >= 0x7F800000


@pytest.mark.parametrize("name", ["heavy", "ties", "signed_zeros", "zeros"])
def test_low_histogram_counts_the_boundary_bin_only(name: str) -> None:
    raw = sample_inputs()[name].view(np.uint32)
    mags = raw & MAG
    for high_bin in {int(mags[0] >> 15), int(np.sort(mags)[mags.size // 2]) >> 15, 0, 0xFFFF}:
        want = np.bincount(mags[(mags >> 15) == high_bin] & 0x7FFF, minlength=1 << 15)
        got = np.zeros(1 << 15, dtype=np.int64)
        sparsify._hist_low_raw(raw, high_bin, got)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("name", sorted(sample_inputs()))
def test_emission_without_tie_counter_equals_the_counted_emission(name: str) -> None:
    x = sample_inputs()[name]
    raw = x.view(np.uint32)
    idx = np.arange(x.size, dtype=np.int64) * 3
    for threshold in {int(v) for v in np.quantile(raw & MAG, [0.0, 0.3, 0.9, 1.0], method="lower")}:
        ties = int(((raw & MAG) == threshold).sum())
        a_idx, a_raw = np.empty(x.size, np.int64), np.empty(x.size, np.uint32)
        b_idx, b_raw = np.empty(x.size, np.int64), np.empty(x.size, np.uint32)
        count, used = sparsify._emit_filtered(idx, raw, threshold, ties, a_idx, a_raw)
        assert used == ties
        assert sparsify._emit_at_least(idx, raw, threshold, b_idx, b_raw) == count
        keep = (raw & MAG) >= threshold
        assert np.array_equal(b_idx[:count], idx[keep]) and np.array_equal(b_raw[:count], raw[keep])
        assert np.array_equal(a_idx[:count], b_idx[:count])


def test_boundary_is_the_bin_of_the_kth_largest() -> None:
    rng = np.random.default_rng(5)
    hist = rng.integers(0, 4, 300).astype(np.int64)
    hist[[0, 150, 299]] = [2, 7, 1]
    total = int(hist.sum())
    for k in range(1, total + 1):
        from_top = np.cumsum(hist[::-1])
        pos = int(np.searchsorted(from_top, k))
        want = (hist.size - 1 - pos, int(from_top[pos - 1]) if pos else 0)
        assert sparsify._boundary(hist, k) == want


def split(x: np.ndarray, sizes: list[int]) -> list[torch.Tensor]:
    return [torch.from_numpy(p.copy()) for p in np.split(x, np.cumsum(sizes)[:-1])]


@pytest.mark.parametrize("case", ["zeros", "signed_zeros", "odd_sizes", "global_with_tiny", "ties"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.999, 1.0])
def test_topk_select_equals_the_full_select_on_edge_cases(case: str, density: float) -> None:
    rng = np.random.default_rng(11)
    n = (1 << 18) + 37  # above FILTER_MIN_NUMEL, not a multiple of 64
    if case == "zeros":
        flats = [torch.zeros(n)]
    elif case == "signed_zeros":
        flats = [torch.from_numpy(np.where(rng.random(n) < 0.5, -0.0, 0.0).astype(np.float32))]
    elif case == "odd_sizes":
        flats = split((rng.standard_t(3, n) * 1e-3).astype(np.float32), [n - 200, 127, 73])
    elif case == "global_with_tiny":
        flats = split((rng.standard_t(3, n) * 1e-3).astype(np.float32), [1, n - 2, 1])
    else:
        flats = [torch.from_numpy(rng.integers(-50, 51, n).astype(np.float32))]
    names = [f"t{i}" for i in range(len(flats))]
    k = sparsify.topk_count(sum(f.numel() for f in flats), density)
    full = sparsify._topk_full(flats, k, names)
    picked = sparsify.topk_select(flats, k, names)
    assert sum(i.numel() for i in full) == k
    for f, want, (idx, vals) in zip(flats, full, picked, strict=True):
        assert torch.equal(idx, want)
        assert torch.equal(vals.view(torch.int32), f[want].view(torch.int32))  # −0.0 kept as −0.0


def test_selection_error_wins_over_a_later_stage_error_whatever_the_order() -> None:
    """A NaN found by top-k in tensor 'b' is reported even when tensor 'a' (earlier in name order)
    would fail later, at fp16 quantisation: selection runs, in effect, before any encoding."""
    big = torch.full((1 << 19,), 1e6)
    bad = torch.randn(1 << 19, generator=torch.Generator().manual_seed(0))
    bad[7] = float("nan")
    cfg = CodecConfig(density=0.1, values="fp16", error_feedback=False)
    with pytest.raises(CodecError, match="'b' holds NaN"):
        encode_package({"a": big, "b": bad}, cfg, meta=PackageMeta("c", 1, "v0", "0" * 64))
    with pytest.raises(CodecError, match="'a' has \\|x\\|"):
        encode_package({"a": big, "b": bad.nan_to_num()}, cfg, meta=PackageMeta("c", 1, "v0", "0" * 64))


# ------------------------------------------------------------------------------------ index coding


def gap_stats_reference(indices: np.ndarray, r_lo: int, m: int) -> tuple[int, list[int]]:
    gaps = [int(g) for g in index_coding.gaps_of(indices)]
    varint = sum(max(1, -(-g.bit_length() // 7)) for g in gaps)
    return varint, [sum(g >> (r_lo + j) for g in gaps) for j in range(m)]


@pytest.mark.parametrize("m", [1, 3, 5])
def test_gap_statistics_match_the_definition(m: int) -> None:
    rng = np.random.default_rng(m)
    gaps = rng.geometric(0.05, 5_000) - 1
    gaps[[0, 10, 20, 30]] = [0, 1 << 14, (1 << 56) + 3, 1 << 40]
    indices = np.cumsum(gaps + 1) - 1
    for r_lo in (0, 2, 19):
        sums = np.zeros(m, dtype=np.int64)
        varint = index_coding._gap_stats(indices, r_lo, sums)
        assert (varint, sums.tolist()) == gap_stats_reference(indices, r_lo, m)
    assert index_coding._gap_stats(np.zeros(0, np.int64), 0, np.zeros(5, np.int64)) == 0


def rice_bits(gaps: np.ndarray, r: int) -> bytes:
    bits: list[int] = []
    for g in gaps.tolist():
        bits += [1] * (g >> r) + [0] + [(g >> j) & 1 for j in range(r)]
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        out[i >> 3] |= b << (i & 7)
    return bytes(out)


@pytest.mark.parametrize("r", [0, 1, 2, 8, 23, 31, 40])
def test_rice_codes_at_every_length_boundary(r: int) -> None:
    """Codes of 1 + q + r bits around the one-step limit (56) and the 32-bit pieces of long codes."""
    qs = [0, 1, 7, 8, 22, 23, 24, 25, 31, 32, 33, 54, 55, 56, 57, 63, 64, 65, 100]
    rng = np.random.default_rng(r)
    gaps = np.array([(q << r) | int(rng.integers(0, 1 << r)) for q in qs for _ in range(3)], dtype=np.int64)
    gaps = gaps[rng.permutation(gaps.size)]
    indices = np.cumsum(gaps + 1) - 1
    numel = int(indices[-1]) + 1
    payload = index_coding.encode("rice", indices, numel, r)
    assert payload == rice_bits(gaps, r)
    assert np.array_equal(
        index_coding.decode("rice", payload, numel, indices.size, r, name="t").numpy(), indices
    )


def test_rice_encoder_refuses_unsorted_indices_instead_of_overrunning() -> None:
    with pytest.raises(CodecError, match="sorted unique"):
        index_coding.encode("rice", np.array([5, 900, 3, 999], dtype=np.int64), 1000, 0)


def rice_decode_reference(data: bytes, nnz: int, numel: int, r: int) -> tuple[int, list[int]]:
    """Bit by bit, with the statuses of index_coding._STATUS checked in the decoder's order."""
    bits = [(byte >> j) & 1 for byte in data for j in range(8)]
    bp, prev, out = 0, -1, []
    for _ in range(nnz):
        q = 0
        while True:
            if bp >= len(bits):
                return -1, out
            bp += 1
            if bits[bp - 1] == 0:
                break
            q += 1
            if q > numel >> r:
                return -3, out
        if bp + r > len(bits):
            return -1, out
        rem = sum(bits[bp + j] << j for j in range(r))
        bp += r
        idx = prev + 1 + ((q << r) | rem)
        if idx >= numel:
            return -3, out
        out.append(idx)
        prev = idx
    if (bp + 7) // 8 != len(data) or any(bits[bp:]):
        return -4, out
    return 0, out


def test_rice_decoder_matches_the_bitwise_reference_on_valid_and_corrupt_payloads() -> None:
    rng = np.random.default_rng(2024)
    for trial in range(400):
        r = int(rng.choice([0, 1, 2, 3, 6, 17, 40]))
        k = int(rng.integers(0, 40 if trial % 4 else 900))
        gaps = (rng.geometric(1.0 / (1 << min(r, 20)) if r else 0.5, k) - 1).astype(np.int64)
        if k and trial % 5 == 0:
            gaps[int(rng.integers(0, k))] += int(rng.integers(1, 1 << 12)) << r  # a long unary run
        indices = np.cumsum(gaps + 1) - 1
        numel = (int(indices[-1]) + 1 if k else 1) + int(rng.integers(0, 5))
        nnz = k
        data = bytearray(index_coding.encode("rice", indices, numel, r))
        mode = trial % 4
        if mode == 1 and data:
            for _ in range(int(rng.integers(1, 4))):
                bit = int(rng.integers(0, 8 * len(data)))
                data[bit >> 3] ^= 1 << (bit & 7)
        elif mode == 2:
            data = data[: int(rng.integers(0, len(data) + 1))] + bytes(int(rng.integers(0, 3)))
        elif mode == 3:
            data = bytearray(rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes())
            nnz, numel = int(rng.integers(0, 60)), int(rng.integers(1, 1 << 16))
        out = np.full(nnz, -1, dtype=np.int64)
        status = index_coding._rice_decode(np.frombuffer(bytes(data), dtype=np.uint8), nnz, numel, r, out)
        want_status, want = rice_decode_reference(bytes(data), nnz, numel, r)
        assert status == want_status, (trial, r, nnz, numel)
        if status == 0:
            assert out.tolist() == want
        if mode == 0:
            assert status == 0 and np.array_equal(out, indices)


# ------------------------------------------------------------------------------------- quantisation


def quantize_reference(x: np.ndarray, block: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    q = np.empty(x.size, dtype=np.int8)
    scales = np.empty(-(-x.size // block), dtype=np.float32)
    for b in range(scales.size):
        part = x[b * block : (b + 1) * block]
        s = np.float32(np.abs(part).max() / np.float32(qmax))
        with np.errstate(over="ignore", invalid="ignore"):  # a subnormal scale: 1/s = inf
            inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
            y = np.rint(part * inv)
        scales[b] = s
        q[b * block : (b + 1) * block] = np.clip(np.nan_to_num(y, nan=0.0), -qmax, qmax).astype(np.int8)
    return q, scales


@pytest.mark.parametrize("name", sorted(sample_inputs()))
@pytest.mark.parametrize("block", [1, 7, 64, 256])
@pytest.mark.parametrize("qmax", [7, 127])
def test_blockwise_quantisation_matches_the_reference(name: str, block: int, qmax: int) -> None:
    x = sample_inputs()[name]
    if name == "ties":
        x = x * np.float32(0.5)  # exact .5 multiples of the scale: round-half-even decides
    q = np.empty(x.size, dtype=np.int8)
    scales = np.empty(-(-x.size // block), dtype=np.float32)
    quantize._quantize_blocks(x, block, np.float32(qmax), q, scales)
    want_q, want_scales = quantize_reference(x, block, qmax)
    assert np.array_equal(scales.view(np.uint32), want_scales.view(np.uint32))
    assert np.array_equal(q, want_q)
    rec = np.empty(x.size, dtype=np.float32)
    quantize._dequantize_blocks(q, scales, block, rec)
    assert np.array_equal(rec, q.astype(np.float32) * np.repeat(scales, block)[: x.size])


def test_round_half_even_on_exact_halves() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, -6.5, 7.0, 3.5], dtype=np.float32)
    q = np.empty(x.size, dtype=np.int8)
    scales = np.empty(1, dtype=np.float32)
    quantize._quantize_blocks(x, 16, np.float32(7), q, scales)  # scale 1: x itself is rounded
    assert scales[0] == 1.0
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 6, -6, 7, 4]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 64, 255, 10_001])
def test_nibble_packing_round_trips_and_matches_the_layout(n: int) -> None:
    q = np.random.default_rng(n).integers(-8, 8, n).astype(np.int8)
    nib = (q.astype(np.int16) + 8).astype(np.uint8)
    if n % 2:
        nib = np.append(nib, np.uint8(8))
    want = (nib[0::2] | (nib[1::2] << np.uint8(4))).tobytes()
    packed = quantize._pack_nibbles(torch.from_numpy(q))
    assert packed == want
    assert np.array_equal(quantize._unpack_nibbles(packed, n), q)


# ---------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_residual_is_the_torch_subtraction_bit_for_bit(owned: bool, sparse: bool) -> None:
    g = torch.Generator().manual_seed(7)
    c = torch.randn(10_003, generator=g) * 1e-3
    indices = torch.randperm(10_003, generator=g)[:997].sort().values if sparse else None
    rec = torch.randn(997 if sparse else 10_003, generator=g) * 1e-3
    if indices is None:
        want = c - rec
    else:
        want = c.clone()
        want[indices] = c[indices] - rec
    given = c.clone()
    got = error_feedback.residual_after(given, indices, rec, (10_003,), owned=owned)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (got.data_ptr() == given.data_ptr()) == owned  # owned: the codec's buffer is reused
    if not owned:
        assert torch.equal(given, c)


def test_corrected_delta_is_the_torch_sum_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(8)
    delta, residual = torch.randn(3, 1001, generator=g), torch.randn(3, 1001, generator=g) * 1e-3
    got = error_feedback.corrected(delta, residual)
    assert torch.equal(got, (delta + residual).reshape(-1))
    assert error_feedback.corrected(delta, None).data_ptr() == delta.data_ptr()  # no copy without residual


def test_quantisation_accepts_a_strided_view() -> None:
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(9))[:, 1]
    assert not x.is_contiguous()
    for encoding in ("int8", "int4"):
        strided = quantize.encode(x, encoding, 64, name="x", reconstruct=True)
        dense = quantize.encode(x.contiguous(), encoding, 64, name="x", reconstruct=True)
        assert (strided.data, strided.scales) == (dense.data, dense.scales)
