"""The codec's fast paths change speed only, never bytes: the filtered top-k selects exactly what the
full radix select selects (ties included), a threaded encode is byte-identical to a serial one, and
the accumulator Rice coder writes the bits of the plain bit-by-bit definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.codec import (
    CodecConfig,
    PackageMeta,
    decode_package,
    encode_package,
    index_coding,
    package,
    sparsify,
)
from fedmerge.errors import CodecError

META = PackageMeta("c", 1, "v0", "0" * 64)
N = 1 << 19  # above FILTER_MIN_NUMEL and PARALLEL_MIN_NUMEL


def heavy(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) / torch.randn(n, generator=g).abs().add(0.05)


def cases() -> dict[str, list[torch.Tensor]]:
    ties = torch.randint(-6, 7, (N,), generator=torch.Generator().manual_seed(3)).float()
    rows = heavy(N, 4).reshape(-1, 512)
    rows[:, ::2] *= 100.0  # structure aligned with any even stride
    return {
        "heavy": [heavy(N, 1)],
        "global": [heavy(N // 2, 2), heavy(N, 5) * 3.0],
        "ties": [ties],
        "constant": [torch.full((N,), 0.5)],  # every entry tied: the filter cannot cut, full select runs
        "structured": [rows.reshape(-1)],
    }


@pytest.mark.parametrize("name", sorted(cases()))
@pytest.mark.parametrize("density", [0.01, 0.1, 0.2, 0.5])
def test_filtered_topk_equals_the_full_radix_select(name: str, density: float) -> None:
    flats = cases()[name]
    k = sparsify.topk_count(sum(f.numel() for f in flats), density)
    names = [f"t{i}" for i in range(len(flats))]
    full = sparsify._topk_full(flats, k, names)
    picked = sparsify.topk_select(flats, k, names)
    assert sum(len(i) for i in full) == k
    for f, want, (idx, vals) in zip(flats, full, picked, strict=True):
        assert torch.equal(idx, want)
        assert torch.equal(vals, f[want])


def test_filtered_topk_names_the_non_finite_tensor() -> None:
    good, bad = heavy(N, 6), heavy(N, 7)
    bad[12345] = float("nan")
    with pytest.raises(CodecError, match="'b' holds NaN"):
        sparsify.topk_select([good, bad], N // 10, ["a", "b"])


@pytest.mark.parametrize("values", ["int8", "int4", "fp16"])
def test_threaded_encode_is_byte_identical_to_serial(values: str, monkeypatch: pytest.MonkeyPatch) -> None:
    delta = {f"w{i}": heavy(N // 2, 10 + i).reshape(-1, 256) for i in range(3)}
    cfg = CodecConfig(density=0.1, values=values, error_feedback=False)  # type: ignore[arg-type]
    threaded = encode_package(delta, cfg, meta=META).data
    monkeypatch.setattr(package, "PARALLEL_MIN_NUMEL", 1 << 62)
    assert encode_package(delta, cfg, meta=META).data == threaded
    decoded = decode_package(threaded)
    assert set(decoded.tensors) == set(delta)


def rice_reference(gaps: np.ndarray, r: int) -> bytes:
    bits: list[int] = []
    for g in gaps.tolist():
        bits += [1] * (g >> r) + [0] + [(g >> j) & 1 for j in range(r)]
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        out[i >> 3] |= b << (i & 7)
    return bytes(out)


@pytest.mark.parametrize("r", [0, 1, 3, 7, 33, 40])
def test_rice_coder_matches_the_bitwise_definition(r: int) -> None:
    rng = np.random.default_rng(r)
    gaps = np.concatenate([rng.geometric(0.1, 300) - 1, [0, 70, 1 << 36, 5]]).astype(np.int64)
    if r < 30:
        gaps = gaps[gaps < (40 << r)]  # keep the unary parts short for small r
    idx = np.cumsum(gaps + 1) - 1
    numel = int(idx[-1]) + 1
    payload = index_coding.encode("rice", idx, numel, r)
    assert payload == rice_reference(gaps, r)
    assert torch.equal(
        index_coding.decode("rice", payload, numel, idx.size, r, name="t"), torch.from_numpy(idx)
    )


def small_cases() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(8)
    return {
        "layers": [heavy(n, i) for i, n in enumerate((8192, 128, 8192, 64, 640, 10))],  # digits' MLP
        "ties": [torch.randint(-3, 4, (n,), generator=g).float() for n in (700, 33, 5000)],
        "constant": [torch.full((4000,), -0.25), torch.full((96,), 0.25)],
        "one": [torch.tensor([2.0])],
        "edge": [heavy(sparsify.SMALL_MAX_NUMEL - 1, 9)],
    }


def stable_reference(flats: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k largest |x| over all tensors, ties by (tensor order, flat index): a stable sort."""
    flat = torch.cat(flats).abs()
    order = torch.sort(-flat.double(), stable=True).indices[:k]
    out, start = [], 0
    for f in flats:
        mine = order[(order >= start) & (order < start + f.numel())] - start
        out.append(torch.sort(mine).values)
        start += f.numel()
    return out


@pytest.mark.parametrize("name", sorted(small_cases()))
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.99])
def test_small_topk_equals_the_histogram_select_and_a_sort(
    name: str, density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    flats = small_cases()[name]
    total = sum(f.numel() for f in flats)
    assert total < sparsify.SMALL_MAX_NUMEL
    k = sparsify.topk_count(total, density)
    names = [f"t{i}" for i in range(len(flats))]
    small = sparsify.topk_indices(flats, k, names)
    monkeypatch.setattr(sparsify, "SMALL_MAX_NUMEL", 0)  # the two 2^16/2^15-bin histogram passes
    histogram = sparsify.topk_indices(flats, k, names)
    for got, want, ref in zip(small, histogram, stable_reference(flats, k), strict=True):
        assert torch.equal(got, want) and torch.equal(got, ref)


def test_small_topk_names_the_non_finite_tensor() -> None:
    good, bad = heavy(300, 6), heavy(200, 7)
    bad[17] = float("-inf")
    with pytest.raises(CodecError, match="'b' holds NaN"):
        sparsify.topk_select([good, bad], 50, ["a", "b"])
