"""Each stage alone: exactness of top-k, determinism of random-k, quantisation bounds, index codings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedmerge.codec import index_coding, quantize, sparsify
from fedmerge.codec.errors import InvalidIndices, PayloadSizeMismatch
from fedmerge.errors import CodecError
from fedmerge.seeds import random_k_seed


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (1000, 1), (1000, 999), (5000, 500)])
def test_topk_keeps_exactly_the_k_largest_magnitudes(
    n: int, k: int, tails: Callable[..., torch.Tensor]
) -> None:
    x = tails((n,), seed=n + k)
    x[::5] = x[n // 2]  # many ties at one magnitude
    idx = sparsify.topk_indices([x], k, ["t"])[0]
    assert idx.numel() == k
    assert bool((idx[1:] > idx[:-1]).all())
    kth = x.abs().topk(k).values[-1]
    assert bool((x.abs()[idx] >= kth).all())
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[idx] = False
    if dropped.any():
        assert float(x.abs()[dropped].max()) <= float(kth)


def test_global_topk_uses_one_threshold_across_tensors(tails: Callable[..., torch.Tensor]) -> None:
    small, large = tails((300,), 1, scale=1e-4), tails((500,), 2, scale=1e-2)
    picked = sparsify.topk_indices([small, large], 100, ["s", "l"])
    assert sum(p.numel() for p in picked) == 100
    everything = torch.cat([small.abs(), large.abs()])
    kth = everything.topk(100).values[-1]
    assert bool((small.abs()[picked[0]] >= kth).all()) and bool((large.abs()[picked[1]] >= kth).all())
    assert picked[1].numel() > picked[0].numel()  # the large-scale tensor wins most slots


def test_topk_refuses_non_finite_input() -> None:
    x = torch.zeros(10)
    x[4] = float("nan")
    with pytest.raises(CodecError, match="'bad'"):
        sparsify.topk_indices([x], 3, ["bad"])


def test_randomk_is_reproducible_and_keeps_density_fraction() -> None:
    thr = sparsify.keep_threshold(0.25)
    a, count = sparsify.randomk_indices(1234, thr, 100_000)
    b, _ = sparsify.randomk_indices(1234, thr, 100_000, expected=count)
    c, _ = sparsify.randomk_indices(1235, thr, 100_000)
    assert torch.equal(a, b) and not torch.equal(a[:100], c[:100])
    assert abs(count / 100_000 - 0.25) < 0.01  # 7 standard deviations


def test_randomk_golden_positions_are_stable() -> None:
    """splitmix64 is defined bit for bit: these positions must never change (golden files rely on it)."""
    idx, _ = sparsify.randomk_indices(42, sparsify.keep_threshold(0.5), 16)
    assert idx.tolist() == _RANDOMK_GOLDEN


_RANDOMK_GOLDEN = [5, 6, 7, 9, 13, 15]


def test_derive_seed_depends_on_every_input() -> None:
    base = random_k_seed(0, "c", 1, "w")
    assert len({base, random_k_seed(1, "c", 1, "w"), random_k_seed(0, "d", 1, "w")}) == 3
    assert len({base, random_k_seed(0, "c", 2, "w"), random_k_seed(0, "c", 1, "v")}) == 3


@pytest.mark.parametrize("encoding", quantize.ENCODINGS)
@pytest.mark.parametrize("block", [1, 7, 256])
def test_quantisation_respects_its_declared_bound(
    encoding: str, block: int, tails: Callable[..., torch.Tensor]
) -> None:
    x = tails((1001,), seed=block)
    x[10] = 0.0
    q = quantize.encode(x, encoding, block, name="t", reconstruct=True)
    assert len(q.data) == quantize.value_bytes(encoding, x.numel())
    assert len(q.scales) == quantize.scale_bytes(encoding, x.numel(), block)
    back = quantize.decode(encoding, q.data, q.scales, x.numel(), block)
    assert back.dtype == torch.float32
    assert q.reconstructed is not None and torch.equal(back, q.reconstructed)
    err = (back - x).abs()
    assert bool((err <= quantize.error_bound(x, encoding, block)).all())
    if (encoding, block) != ("sign", 1):  # one value per block: sign(x)·|x| = x
        assert quantize.PROPERTIES[encoding].lossless == bool(err.max() == 0)


@pytest.mark.parametrize("block", [1, 5, 64, 4096])
def test_sign_values_are_the_ternary_of_sparse_ternary_compression(
    block: int, tails: Callable[..., torch.Tensor]
) -> None:
    """Plain reference (Sattler et al. 2019, Alg. 1, with μ per block): x̂_i = sign(x_i)·mean_b|x|."""
    x = tails((1000,), seed=block).to(torch.float64)
    x[3] = 0.0  # a zero carried value decodes to +μ (bit clear)
    want = torch.empty_like(x)
    for lo in range(0, x.numel(), block):
        part = x[lo : lo + block]
        want[lo : lo + block] = torch.where(part < 0, -1.0, 1.0) * part.abs().mean()
    q = quantize.encode(x.float(), "sign", block, name="t", reconstruct=False)
    assert len(q.data) == 125 and len(q.scales) == 4 * -(-1000 // block)
    back = quantize.decode("sign", q.data, q.scales, 1000, block)
    assert torch.allclose(back.double(), want, rtol=1e-6, atol=0)
    assert not bool(torch.signbit(back[3]))  # +μ (+0 when the block is that zero alone)
    assert all(back[lo : lo + block].abs().unique().numel() == 1 for lo in range(0, 1000, block))


def test_int8_error_is_not_trivially_zero(tails: Callable[..., torch.Tensor]) -> None:
    x = tails((512,), seed=3)
    back = quantize.decode("int8", *_enc(x, "int8"), 512, 64)
    assert float((back - x).abs().max()) > 0


def _enc(x: torch.Tensor, encoding: str) -> tuple[bytes, bytes]:
    q = quantize.encode(x, encoding, 64, name="t", reconstruct=False)
    return q.data, q.scales


def test_fp16_overflow_names_the_tensor() -> None:
    with pytest.raises(CodecError, match=r"'big'.*fp16"):
        quantize.encode(torch.tensor([1e6]), "fp16", 1, name="big", reconstruct=False)


@pytest.mark.parametrize("coding", index_coding.CODINGS)
@pytest.mark.parametrize("n,k", [(1, 1), (8, 0), (9, 9), (1000, 17), (100_000, 10_000), (70_000, 20)])
def test_index_codings_round_trip(coding: str, n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    sizes = index_coding.sizes(idx, n)
    data = index_coding.encode(coding, idx, n, sizes[coding][1])
    assert len(data) == sizes[coding][0]
    back = index_coding.decode(coding, data, n, k, sizes[coding][1], name="t")
    assert np.array_equal(back.numpy(), idx)


def test_auto_picks_the_smallest_coding() -> None:
    rng = np.random.default_rng(0)
    for n, k, expected in [(100_000, 100, "rice"), (100_000, 60_000, "bitmap"), (10, 1, "varint")]:
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        coding, _ = index_coding.choose(idx, n, "auto")
        sizes = index_coding.sizes(idx, n)
        assert coding == expected
        assert sizes[coding][0] == min(s for s, _ in sizes.values())


def test_rice_beats_varint_at_ten_percent() -> None:
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(1_000_000, size=100_000, replace=False)).astype(np.int64)
    sizes = index_coding.sizes(idx, 1_000_000)
    assert sizes["rice"][0] < 0.7 * sizes["varint"][0]


@pytest.mark.parametrize(
    "coding,data,nnz",
    [
        ("varint", bytes([0x80]), 1),  # truncated
        ("varint", bytes([1, 1, 1]), 2),  # trailing byte
        ("varint", bytes([0x80] * 9 + [1]), 1),  # too long
        ("varint", bytes([200, 1]), 1),  # index 200 >= numel 100
        ("rice", bytes([0xFF, 0xFF]), 1),  # unary never ends
        ("coo", np.array([5, 3], dtype="<i4").tobytes(), 2),  # not increasing
        ("coo", np.array([3, 3], dtype="<i4").tobytes(), 2),  # duplicate
        ("coo", np.array([-1], dtype="<i4").tobytes(), 1),  # negative
        ("bitmap", bytes([1] + [0] * 12), 2),  # count mismatch
        ("bitmap", bytes([0] * 12 + [0x80]), 1),  # bit past numel (100 → 13 bytes, bits 100..103 unused)
    ],
)
def test_corrupt_index_payloads_are_refused(coding: str, data: bytes, nnz: int) -> None:
    with pytest.raises((InvalidIndices, PayloadSizeMismatch), match="'t'"):
        index_coding.decode(coding, data, 100, nnz, 0, name="t")
