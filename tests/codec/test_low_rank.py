"""Low-rank factor pairs (``CodecConfig.rank``): the truncated SVD against a plain reference, the wire
format (package format 3), error feedback, and what a decoder refuses."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package
from fedmerge.codec.errors import (
    MalformedPackage,
    NonFiniteValues,
    TensorShapeMismatch,
    UnsupportedFormatVersion,
)
from fedmerge.codec.low_rank import EXACT_SVD_MAX_DIM, factored_numel, factorize, product, qualifies
from fedmerge.codec.package import LOW_RANK_FORMAT, PACKAGE_FORMAT_VERSION
from fedmerge.errors import CodecError, ConfigError
from fedmerge.v1 import delta_pb2

Resign = Callable[[delta_pb2.DeltaPackage], bytes]


def _matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The plain reference: U_r diag(s_r) V_rᵀ from a full SVD (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(matrix.double())
    return (u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize("rows,cols,rank", [(64, 48, 1), (96, 64, 4), (10, 64, 3), (128, 64, 16)])
def test_factors_give_the_best_rank_r_approximation(rows: int, cols: int, rank: int) -> None:
    m = _matrix(rows, cols, rows + cols)
    values = factorize(m, rank)
    assert values.numel() == factored_numel((rows, cols), rank) == rank * (rows + cols)
    approx = product(values, (rows, cols), rank)
    torch.testing.assert_close(approx, _best_rank(m, rank), rtol=1e-4, atol=1e-4)
    s = torch.linalg.svdvals(m.double())  # the truncation error is the tail of the spectrum
    assert math.isclose(float((m - approx).double().norm()), float(s[rank:].norm()), rel_tol=1e-4)
    p, q = values[: rows * rank].reshape(rows, rank), values[rows * rank :].reshape(rank, cols)
    torch.testing.assert_close(p.norm(dim=0), q.norm(dim=1), rtol=1e-4, atol=1e-6)  # Σ split evenly


def test_large_matrices_take_the_randomized_range_finder() -> None:
    rows, cols, rank = EXACT_SVD_MAX_DIM + 88, EXACT_SVD_MAX_DIM + 8, 3
    low = _matrix(rows, rank, 1) @ _matrix(rank, cols, 2)
    m = low + 1e-4 * _matrix(rows, cols, 3)
    values = factorize(m, rank)
    approx = product(values, (rows, cols), rank)
    assert float((approx - low).norm() / low.norm()) < 1e-4
    assert torch.equal(values, factorize(m, rank))  # deterministic: its own seeded generator


def test_which_tensors_qualify() -> None:
    assert qualifies((128, 64), 2) and qualifies((10, 64), 4)
    assert not qualifies((10, 64), 5)  # 5·74·2 > 640: the pair would not save half
    assert not qualifies((128,), 2) and not qualifies((4, 4, 4), 1) and not qualifies((64, 2), 2)
    assert not qualifies((128, 64), 0)
    with pytest.raises(ConfigError, match="rank"):
        CodecConfig(rank=-1)
    with pytest.raises(CodecError, match="2-D"):
        factorize(torch.zeros(8), 1)


def _lora_delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(64, 4, generator=g), torch.randn(4, 96, generator=g)
    return {"q.weight": 2.0 * b @ a, "q.bias": torch.randn(64, generator=g), "norm.weight": torch.zeros(96)}


def test_a_lora_update_travels_exactly_at_its_rank(meta: PackageMeta) -> None:
    delta = _lora_delta()
    result = encode_package(delta, CodecConfig(rank=4, values="fp32", density=0.5), meta=meta)
    pkg = delta_pb2.DeltaPackage.FromString(result.data)
    assert pkg.format_version == LOW_RANK_FORMAT
    by_name = {td.name: td for td in pkg.tensors}
    assert by_name["q.weight"].index_encoding == delta_pb2.INDEX_ENCODING_LOW_RANK
    assert by_name["q.weight"].rank == 4 and by_name["q.weight"].nnz == 4 * (64 + 96)
    assert by_name["q.bias"].index_encoding != delta_pb2.INDEX_ENCODING_LOW_RANK  # 1-D: top-k as usual
    decoded = decode_package(result.data, expected_shapes={k: tuple(v.shape) for k, v in delta.items()})
    w = decoded.tensors["q.weight"]
    assert isinstance(w, torch.Tensor)
    torch.testing.assert_close(w, delta["q.weight"], rtol=1e-4, atol=1e-4)
    assert result.report.tensors["q.weight"].value_bytes == 4 * 4 * (64 + 96)
    assert result.report.tensors["q.weight"].index == "low_rank"


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8", "int4", "sign"])
def test_error_feedback_carries_what_the_pair_drops(values: str, meta: PackageMeta) -> None:
    delta = {"w": _matrix(64, 96, 5), "b": _matrix(1, 64, 6).reshape(-1)}
    residual = {"w": 0.1 * _matrix(64, 96, 7), "b": torch.zeros(64)}
    result = encode_package(delta, CodecConfig(rank=2, values=values), meta=meta, residual=residual)  # type: ignore[arg-type]
    decoded = decode_package(result.data).tensors["w"]
    assert isinstance(decoded, torch.Tensor)
    # e' = (δ + e) − ĉ, ĉ being exactly what the receiver rebuilds
    torch.testing.assert_close(
        result.residual["w"].reshape(64, 96), delta["w"] + residual["w"] - decoded, rtol=0, atol=1e-5
    )


def test_packages_without_a_pair_keep_format_2(meta: PackageMeta) -> None:
    delta = {"b": torch.ones(64), "w": torch.ones(3, 3)}  # nothing qualifies at rank 2
    data = encode_package(delta, CodecConfig(rank=2), meta=meta).data
    assert delta_pb2.DeltaPackage.FromString(data).format_version == PACKAGE_FORMAT_VERSION == 2


def _pair_package(meta: PackageMeta, **cfg: object) -> delta_pb2.DeltaPackage:
    data = encode_package({"w": _matrix(64, 96, 9)}, CodecConfig(rank=2, **cfg), meta=meta).data  # type: ignore[arg-type]
    return delta_pb2.DeltaPackage.FromString(data)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda td: setattr(td, "rank", 3), MalformedPackage, "factors P"),  # nnz no longer r·(m+n)
        (lambda td: (setattr(td, "rank", 65), setattr(td, "nnz", 65 * 160)), MalformedPackage, "rank = 65"),
        (lambda td: setattr(td, "rank", 0), MalformedPackage, "rank = 0"),
        (lambda td: td.shape.append(1), MalformedPackage, "2-D"),
        (  # a pair larger than the tensor it stands for
            lambda td: (setattr(td, "rank", 40), setattr(td, "nnz", 40 * 160)),
            MalformedPackage,
            "more than the tensor",
        ),
        (  # finite factors whose product overflows fp32
            lambda td: setattr(td, "values", b"\xff\xff\x7f\x7e" * (len(td.values) // 4)),
            NonFiniteValues,
            "overflows",
        ),
    ],
)
def test_tampered_pairs_are_refused(
    mutate: Callable[[delta_pb2.TensorDelta], object],
    error: type[Exception],
    match: str,
    meta: PackageMeta,
    resigner: Resign,
) -> None:
    pkg = _pair_package(meta, values="fp32")
    mutate(pkg.tensors[0])
    with pytest.raises(error, match=match):
        decode_package(resigner(pkg))


def test_rank_belongs_to_pairs_and_pairs_to_format_3(meta: PackageMeta, resigner: Resign) -> None:
    pkg = _pair_package(meta)
    pkg.format_version = 2
    with pytest.raises(MalformedPackage, match="needs format 3"):
        decode_package(resigner(pkg))
    plain = encode_package({"b": torch.ones(8)}, CodecConfig(), meta=meta).data
    other = delta_pb2.DeltaPackage.FromString(plain)
    other.tensors[0].rank = 2
    with pytest.raises(MalformedPackage, match="pairs only"):
        decode_package(resigner(other))
    pkg = _pair_package(meta)
    pkg.format_version = 4
    with pytest.raises(UnsupportedFormatVersion):
        decode_package(resigner(pkg))


def test_a_pair_for_another_shape_is_refused_before_decoding(meta: PackageMeta) -> None:
    data = _pair_package(meta).SerializeToString()
    with pytest.raises(TensorShapeMismatch, match="base version has"):
        decode_package(data, expected_shapes={"w": (96, 64)})


def test_the_streaming_reader_decodes_and_refuses_pairs_alike(meta: PackageMeta, resigner: Resign) -> None:
    from fedmerge.codec.stream_reader import decode_task_vector_stream

    pkg = _pair_package(meta, values="int8")
    base = {"base_id": meta.base_version_id, "base_hash": meta.base_version_hash}
    streamed, headers = decode_task_vector_stream(pkg.SerializeToString(), {"w": (64, 96)}, **base)
    assert headers[0].index == "low_rank"
    whole = decode_package(pkg.SerializeToString()).tensors["w"]
    assert isinstance(whole, torch.Tensor) and torch.equal(streamed.tensors["w"], whole)  # type: ignore[arg-type]
    pkg.format_version = 2
    with pytest.raises(MalformedPackage, match="needs format 3"):
        decode_task_vector_stream(resigner(pkg), {"w": (64, 96)}, **base)
