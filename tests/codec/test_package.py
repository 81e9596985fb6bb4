"""Whole-package round trips for every stage combination, error feedback and byte accounting."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package, quantize
from fedmerge.codec import sparsify as sparsify_stage
from fedmerge.delta import SparseTensor
from fedmerge.errors import CodecError, ConfigError

Delta = dict[str, torch.Tensor]
COMBOS = list(
    itertools.product(
        ["none", "topk", "randomk"],
        ["fp32", "fp16", "bf16", "int8", "int4", "sign"],
        ["auto", "coo", "bitmap", "varint", "rice"],
    )
)


def _dense(t: torch.Tensor | SparseTensor) -> torch.Tensor:
    return t.to_dense() if isinstance(t, SparseTensor) else t


@pytest.mark.parametrize("sparsify,values,coding", COMBOS)
def test_round_trip_within_the_declared_bounds(
    sparsify: str, values: str, coding: str, delta: Delta, meta: PackageMeta
) -> None:
    cfg = CodecConfig(sparsify=sparsify, values=values, index_coding=coding, density=0.2, block_size=32)  # type: ignore[arg-type]
    result = encode_package(delta, cfg, meta=meta)
    decoded = decode_package(result.data, expected_shapes={k: tuple(v.shape) for k, v in delta.items()})
    assert decoded.meta == meta
    assert set(decoded.tensors) == set(delta)
    for name, x in delta.items():
        got = decoded.tensors[name]
        assert decoded.dtypes[name] == "float32"
        assert tuple(got.shape) == tuple(x.shape)
        if sparsify == "none":
            assert isinstance(got, torch.Tensor)
            idx = torch.arange(x.numel())
            sent = x.reshape(-1)
        else:
            assert isinstance(got, SparseTensor)
            idx = got.indices
            rescale = sparsify_stage.RANDOMK_ONE / sparsify_stage.keep_threshold(0.2)
            sent = x.reshape(-1)[idx] * (rescale if sparsify == "randomk" else 1.0)
            if sparsify == "topk":
                assert got.nnz == math.ceil(0.2 * x.numel())
                assert result.report.tensors[name].index == (
                    coding if coding != "auto" else result.report.tensors[name].index
                )
        values_back = _dense(got).reshape(-1)[idx]
        bound = quantize.error_bound(sent, values, 32)
        assert bool(((values_back - sent).abs() <= bound * (1 + 1e-5) + 1e-12).all()), name
        # error feedback: residual + reconstruction == input, exactly where it was carried
        rec = _dense(got).reshape(-1)
        assert torch.allclose(result.residual[name].reshape(-1) + rec, x.reshape(-1), atol=1e-6)


def test_error_feedback_delays_but_never_loses(delta: Delta, meta: PackageMeta) -> None:
    cfg = CodecConfig(density=0.05, values="int4")
    residual: dict[str, torch.Tensor] | None = None
    sent = {k: torch.zeros_like(v) for k, v in delta.items()}
    rounds = 30
    for _ in range(rounds):
        result = encode_package(delta, cfg, meta=meta, residual=residual)
        for name, t in decode_package(result.data).tensors.items():
            sent[name] += _dense(t)
        residual = result.residual
    assert residual is not None
    for name, x in delta.items():  # Σ ĉ_t = Σ δ_t − e_{T+1}
        assert torch.allclose(sent[name] + residual[name], rounds * x, atol=1e-5)
    without = encode_package(delta, cfg, meta=meta)
    once = sum(float((_dense(t) - delta[n]).norm()) for n, t in decode_package(without.data).tensors.items())
    avg = sum(float((sent[n] / rounds - delta[n]).norm()) for n in delta)
    assert avg < 0.5 * once  # the running average converges toward the true delta


def test_error_feedback_can_be_disabled(delta: Delta, meta: PackageMeta) -> None:
    assert encode_package(delta, CodecConfig(error_feedback=False), meta=meta).residual == {}


def test_byte_report_accounts_for_every_byte(delta: Delta, meta: PackageMeta) -> None:
    result = encode_package(delta, CodecConfig(density=0.1), meta=meta)
    report = result.report
    numel = sum(v.numel() for v in delta.values())
    assert report.total_bytes == len(result.data)
    assert report.dense_fp32_bytes == 4 * numel and report.dense_fp16_bytes == 2 * numel
    for t in report.tensors.values():
        assert t.total_bytes >= t.index_bytes + t.value_bytes + t.scale_bytes + 32
    assert sum(t.total_bytes for t in report.tensors.values()) < report.total_bytes
    assert report.frac_of_fp32 < 0.15


def test_global_scope_keeps_density_over_all_tensors(delta: Delta, meta: PackageMeta) -> None:
    result = encode_package(delta, CodecConfig(density=0.1, scope="global", values="fp32"), meta=meta)
    total = sum(t.nnz for t in result.report.tensors.values())
    assert total == math.ceil(0.1 * sum(v.numel() for v in delta.values()))


def test_small_tensors_stay_dense(delta: Delta, meta: PackageMeta) -> None:
    decoded = decode_package(encode_package(delta, CodecConfig(min_sparse_numel=100), meta=meta).data)
    assert isinstance(decoded.tensors["norm.weight"], torch.Tensor)
    assert isinstance(decoded.tensors["layers.0.attn.weight"], SparseTensor)


def test_sparse_input_keeps_its_support(meta: PackageMeta) -> None:
    st = SparseTensor(torch.tensor([1, 5, 9]), torch.tensor([0.5, -1.0, 2.0]), (3, 4))
    decoded = decode_package(encode_package({"w": st}, CodecConfig(values="fp32"), meta=meta).data)
    got = decoded.tensors["w"]
    assert (
        isinstance(got, SparseTensor)
        and torch.equal(got.indices, st.indices)
        and torch.equal(got.values, st.values)
    )


def test_original_dtype_is_reported_and_values_come_back_fp32(
    meta: PackageMeta, tails: Callable[..., torch.Tensor]
) -> None:
    delta = {"h": tails((10, 10), 1).half(), "b": tails((10,), 2).bfloat16(), "d": tails((5,), 3).double()}
    decoded = decode_package(
        encode_package(delta, CodecConfig(sparsify="none", values="fp32"), meta=meta).data
    )
    assert decoded.dtypes == {"h": "float16", "b": "bfloat16", "d": "float64"}
    for name, x in delta.items():
        got = decoded.tensors[name]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert torch.equal(got, x.float())


def test_encoding_is_deterministic(delta: Delta, meta: PackageMeta) -> None:
    for cfg in (CodecConfig(), CodecConfig(sparsify="randomk", seed=5)):
        assert encode_package(delta, cfg, meta=meta).data == encode_package(delta, cfg, meta=meta).data


def test_randomk_seed_depends_on_client_and_round(delta: Delta, meta: PackageMeta) -> None:
    cfg = CodecConfig(sparsify="randomk", density=0.3)
    other = PackageMeta("other", meta.round, meta.base_version_id, meta.base_version_hash)
    a = decode_package(encode_package(delta, cfg, meta=meta).data).tensors["layers.1.mlp.weight"]
    b = decode_package(encode_package(delta, cfg, meta=other).data).tensors["layers.1.mlp.weight"]
    assert isinstance(a, SparseTensor) and isinstance(b, SparseTensor)
    assert a.nnz != b.nnz or not torch.equal(a.indices, b.indices)


def test_randomk_is_unbiased_on_average(meta: PackageMeta) -> None:
    x = {"w": torch.full((200, 50), 0.01)}
    total = torch.zeros(200, 50)
    for r in range(40):
        m = PackageMeta("c", r, "v", "h")
        got = decode_package(
            encode_package(x, CodecConfig(sparsify="randomk", density=0.25, values="fp32"), meta=m).data
        )
        total += _dense(got.tensors["w"])
    assert abs(float(total.mean() / 40) - 0.01) < 0.0005  # E[x̂] = x


@pytest.mark.parametrize(
    "delta,residual,match",
    [
        ({"w": torch.tensor([1.0, float("nan")])}, None, "'w'.*non-finite|'w'.*NaN"),
        ({"i": torch.tensor([1, 2])}, None, "'i'.*int64"),
        ({"w": torch.ones(3)}, {"v": torch.ones(3)}, "'v'"),
        ({"w": torch.ones(3)}, {"w": torch.ones(4)}, "'w'.*shape"),
    ],
)
def test_encode_errors_name_the_tensor(
    delta: Delta, residual: Delta | None, match: str, meta: PackageMeta
) -> None:
    with pytest.raises(CodecError, match=match):
        encode_package(delta, CodecConfig(sparsify="none"), meta=meta, residual=residual)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"values": "int2"}, "values"),
        ({"block_size": 0}, "block_size"),
        ({"sparsify": "randomk", "scope": "global"}, "scope"),
        ({"index_coding": "zip"}, "index_coding"),
    ],
)
def test_config_is_validated_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CodecConfig(**kwargs)  # type: ignore[arg-type]


def test_meta_is_validated() -> None:
    with pytest.raises(ConfigError, match="kind"):
        PackageMeta("c", 0, "v", "h", kind="full")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="round"):
        PackageMeta("c", -1, "v", "h")
