"""Value quantisation stage: how the carried values are stored.

| encoding | bytes/value | error bound per value |
|---|---|---|
| fp32 | 4 | 0 (lossless for fp32 input) |
| fp16 | 2 | round-to-nearest: ≤ 2⁻¹¹·|x| for normal values, ≤ 2⁻²⁵ absolute below 2⁻¹⁴ |
| bf16 | 2 | round-to-nearest-even: ≤ 2⁻⁸·|x| (≤ 2⁻¹³³ absolute for subnormals) |
| int8 | 1 + 4/B | q = round(x/s), s = max|x_block|/127, x̂ = q·s: |x − x̂| ≤ s/2 |
| int4 | ½ + 4/B | q = round(x/s), s = max|x_block|/7, stored as q+8 in a nibble: |x − x̂| ≤ s/2 |
| sign | ⅛ + 4/B | s = mean|x_block|, x̂ = sign(x)·s (bit 1 = negative, x = 0 → +s): |x − x̂| = ||x| − s| |

Blocks are B = ``block_size`` consecutive carried values; scales are little-endian fp32. Blockwise
absmax quantisation follows Dettmers et al. 2022 ("8-bit Optimizers via Block-wise Quantization").
Rounding is deterministic round-half-to-even. Decoding always returns fp32.

``sign`` is the value stage of sparse ternary compression (Sattler et al. 2019, "Robust and
Communication-Efficient Federated Learning from Non-IID Data", Alg. 1): after top-k, every carried
value becomes ±μ with μ the mean magnitude of the carried values. The paper takes one μ per tensor;
here μ is per block of B carried values (B ≥ the tensor's carried count gives the paper's single μ),
which costs 4/B bytes per value and follows the magnitudes where they vary along a tensor. It keeps
the direction and the L1 mass of each block; error feedback carries what it drops to the next round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from fedmerge.codec._bitops import float_of_bits, round_half_even
from fedmerge.codec.config import BLOCK_SCALED
from fedmerge.codec.sparsify import StageProperties
from fedmerge.errors import CodecError

ENCODINGS = ("fp32", "fp16", "bf16", "int8", "int4", "sign")
_QMAX = {"int8": 127, "int4": 7}

PROPERTIES: dict[str, StageProperties] = {
    "fp32": StageProperties(True, "x̂ = x"),
    "fp16": StageProperties(False, "|x − x̂| ≤ 2⁻¹¹|x| + 2⁻²⁵"),
    "bf16": StageProperties(False, "|x − x̂| ≤ 2⁻⁸|x| + 2⁻¹³³"),
    "int8": StageProperties(False, "|x − x̂| ≤ s_b/2, s_b = max_block|x|/127"),
    "int4": StageProperties(False, "|x − x̂| ≤ s_b/2, s_b = max_block|x|/7"),
    "sign": StageProperties(False, "x̂ = sign(x)·s_b, s_b = mean_block|x|: |x − x̂| ≤ max_block|x|"),
}


@dataclass(frozen=True)
class QuantizedValues:
    """Encoded values, their block scales (empty unless int8/int4) and, if asked for, x̂ in fp32."""

    data: bytes
    scales: bytes
    reconstructed: torch.Tensor | None


def value_bytes(encoding: str, count: int) -> int:
    """Exact length of the value payload for ``count`` values."""
    if encoding == "fp32":
        return 4 * count
    if encoding in ("fp16", "bf16"):
        return 2 * count
    if encoding == "int8":
        return count
    if encoding == "sign":
        return (count + 7) // 8
    return (count + 1) // 2


def scale_bytes(encoding: str, count: int, block_size: int) -> int:
    """Exact length of the block-scale payload (4 bytes per block of ``block_size`` values)."""
    if encoding not in BLOCK_SCALED:
        return 0
    return 4 * ((count + block_size - 1) // block_size)


def encode(
    values: torch.Tensor, encoding: str, block_size: int, *, name: str, reconstruct: bool
) -> QuantizedValues:
    """Quantise 1-D finite fp32 ``values``; raise :class:`CodecError` (naming ``name``) on fp16 overflow."""
    if encoding == "fp32":
        return QuantizedValues(values.numpy().tobytes(), b"", values if reconstruct else None)
    if encoding in ("fp16", "bf16"):
        low = values.to(torch.float16 if encoding == "fp16" else torch.bfloat16)
        if encoding == "fp16" and not bool(torch.isfinite(low).all()):
            worst = float(values.abs().max())
            raise CodecError(
                f"tensor {name!r} has |x| = {worst:.3g} beyond the fp16 range (65504); "
                "use values='bf16' or 'int8'"
            )
        data = low.view(torch.int16).numpy().tobytes()
        return QuantizedValues(data, b"", low.float() if reconstruct else None)
    n = values.numel()
    if encoding == "sign":
        return _encode_sign(values, block_size, reconstruct)
    q_np = np.empty(n, dtype=np.int8)
    scales_np = np.empty((n + block_size - 1) // block_size, dtype=np.float32)
    _quantize_blocks(
        np.ascontiguousarray(values.numpy()), block_size, np.float32(_QMAX[encoding]), q_np, scales_np
    )
    rec = None
    if reconstruct:
        rec_np = np.empty(n, dtype=np.float32)
        _dequantize_blocks(q_np, scales_np, block_size, rec_np)
        rec = torch.from_numpy(rec_np)
    data = q_np.tobytes() if encoding == "int8" else _pack_nibbles(torch.from_numpy(q_np))
    return QuantizedValues(data, scales_np.astype("<f4").tobytes(), rec)


def decode(encoding: str, data: bytes, scales: bytes, count: int, block_size: int) -> torch.Tensor:
    """fp32 values from a payload whose lengths the caller has checked (value_bytes / scale_bytes)."""
    if encoding == "fp32":
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
    if encoding == "fp16":
        return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
    if encoding == "bf16":
        wide = np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return torch.from_numpy(wide.view(np.float32))
    s = np.frombuffer(scales, dtype="<f4").astype(np.float32)
    out = np.empty(count, dtype=np.float32)
    if encoding == "sign":
        _expand_signs(np.frombuffer(data, dtype=np.uint8), s, block_size, out)
        return torch.from_numpy(out)
    if encoding == "int8":
        _dequantize_blocks(np.frombuffer(data, dtype=np.int8), s, block_size, out)
    else:
        _dequantize_blocks(_unpack_nibbles(data, count), s, block_size, out)
    return torch.from_numpy(out)


def error_bound(values: torch.Tensor, encoding: str, block_size: int) -> torch.Tensor:
    """Per-value bound on |x − x̂| that :func:`encode` guarantees (tests check it elementwise)."""
    a = values.abs()
    if encoding == "fp32":
        return torch.zeros_like(a)
    if encoding == "fp16":
        return a * 2.0**-11 + 2.0**-25
    if encoding == "bf16":
        return a * 2.0**-8 + 2.0**-133
    if encoding == "sign":  # ||x| − mean_b|x|| ≤ max_b|x|
        return _blockwise(torch.ones_like(a), _block_absmax(values, block_size), block_size) * (1 + 1e-6)
    scales = _block_absmax(values, block_size) / _QMAX[encoding]
    per_value = _blockwise(torch.ones_like(a), scales, block_size)
    return per_value * 0.5 * (1 + 1e-6) + a * 1e-7


def _block_absmax(values: torch.Tensor, block_size: int) -> torch.Tensor:
    n = values.numel()
    full = n // block_size
    parts = []
    if full:
        parts.append(values[: full * block_size].view(full, block_size).abs().amax(dim=1))
    if n > full * block_size:
        parts.append(values[full * block_size :].abs().amax().reshape(1))
    return torch.cat(parts) if parts else torch.zeros(0)


def _blockwise(values: torch.Tensor, per_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """values[i] * per_block[i // block_size], as a new fp32 tensor."""
    out = values.to(torch.float32, copy=True)
    n = out.numel()
    full = n // block_size
    if full:
        out[: full * block_size].view(full, block_size).mul_(per_block[:full, None])
    if n > full * block_size:
        out[full * block_size :].mul_(per_block[full])
    return out


def _encode_sign(values: torch.Tensor, block_size: int, reconstruct: bool) -> QuantizedValues:
    """Sign bits (LSB first, 1 = negative) and per-block mean magnitudes of 1-D finite ``values``."""
    v = np.ascontiguousarray(values.numpy())
    bits = np.packbits(np.signbit(v) & (v != 0), bitorder="little")
    scales_np = np.empty((v.size + block_size - 1) // block_size, dtype=np.float32)
    _block_mean_magnitudes(v, block_size, scales_np)
    rec = None
    if reconstruct:
        rec_np = np.empty(v.size, dtype=np.float32)
        _expand_signs(bits, scales_np, block_size, rec_np)
        rec = torch.from_numpy(rec_np)
    return QuantizedValues(bits.tobytes(), scales_np.astype("<f4").tobytes(), rec)


@numba.njit(cache=True, nogil=True)
def _block_mean_magnitudes(values: np.ndarray, block: int, scales: np.ndarray) -> None:
    """s_b = (Σ_block |x_i|) / |block|, summed in float64 and rounded once to fp32."""
    n = np.uint64(values.size)
    width = np.uint64(block)
    for b in range(np.uint64(scales.size)):
        lo = b * width
        hi = min(n, lo + width)
        total = 0.0
        for i in range(lo, hi):
            total += abs(np.float64(values[i]))
        scales[b] = np.float32(total / np.float64(hi - lo))


def _expand_signs(bits: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray) -> None:
    """x̂_i = −s_{i // block} where bit i (LSB first) is set, else +s_{i // block}."""
    set_bits = np.unpackbits(bits, count=out.size, bitorder="little")
    _dequantize_blocks((1 - 2 * set_bits.view(np.int8)).astype(np.int8), scales, block, out)


def _pack_nibbles(q: torch.Tensor) -> bytes:
    """Byte j = (q_{2j} + 8) | (q_{2j+1} + 8) << 4, an odd count padded with the nibble 8 (q = 0)."""
    q_np = q.numpy()
    out = np.empty((q_np.size + 1) // 2, dtype=np.uint8)
    _pack_nibble_pairs(q_np, out)
    return out.tobytes()


@numba.njit(cache=True, nogil=True)
def _pack_nibble_pairs(q: np.ndarray, out: np.ndarray) -> None:
    """out[j] = (q[2j] + 8) | (q[2j+1] + 8) << 4 for int4 codes q in [−8, 7]; a last odd code is
    paired with the nibble 8."""
    pairs = np.uint64(q.size // 2)
    for j in range(pairs):
        lo = np.uint8(q[2 * j] + 8)
        hi = np.uint8(q[2 * j + 1] + 8)
        out[j] = lo | (hi << np.uint8(4))
    if q.size % 2:
        out[q.size // 2] = np.uint8(q[q.size - 1] + 8) | np.uint8(0x80)


def _unpack_nibbles(data: bytes, count: int) -> np.ndarray:
    """int4 codes q_i = nibble_i − 8 (low nibble first) of the first ``count`` nibbles of ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(raw.size * 2, dtype=np.int8)
    _unpack_nibble_pairs(raw, out)
    return out[:count]


@numba.njit(cache=True, nogil=True)
def _unpack_nibble_pairs(raw: np.ndarray, out: np.ndarray) -> None:
    """out[2j] = (raw[j] & 15) − 8, out[2j+1] = (raw[j] >> 4) − 8."""
    for j in range(np.uint64(raw.size)):
        b = raw[j]
        out[2 * j] = np.int8(b & np.uint8(15)) - np.int8(8)
        out[2 * j + np.uint64(1)] = np.int8(b >> np.uint8(4)) - np.int8(8)


@numba.njit(cache=True, nogil=True)
def _quantize_blocks(
    values: np.ndarray, block: int, qmax: np.float32, q: np.ndarray, scales: np.ndarray
) -> None:
    """s_b = max|x_b|/qmax; q = clamp(round_half_even(x · (1/s_b)), −qmax, qmax) (q = 0 when s_b = 0).

    ``values`` must be finite: max|x_b| is taken on the magnitude bit patterns (ordered like the
    magnitudes of finite floats), which vectorises where a float maximum does not. Unsigned loop
    indices spare the negative-index checks that otherwise keep these loops scalar."""
    n = np.uint64(values.size)
    bits = values.view(np.uint32)
    width = np.uint64(block)
    for b in range(np.uint64(scales.size)):
        lo = b * width
        hi = min(n, lo + width)
        top = np.uint32(0)
        for i in range(lo, hi):
            top = max(top, bits[i] & np.uint32(0x7FFFFFFF))
        s = np.float32(float_of_bits(top) / qmax)
        scales[b] = s
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        for i in range(lo, hi):
            r = round_half_even(values[i] * inv)
            q[i] = np.int8(min(qmax, max(-qmax, r)))


@numba.njit(cache=True, nogil=True)
def _dequantize_blocks(q: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray) -> None:
    """x̂_i = q_i · s_{i // block} in fp32."""
    n = np.uint64(out.size)
    width = np.uint64(block)
    for b in range(np.uint64(scales.size)):
        lo = b * width
        hi = min(n, lo + width)
        s = scales[b]
        for i in range(lo, hi):
            out[i] = np.float32(q[i]) * s
