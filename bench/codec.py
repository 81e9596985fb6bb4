"""Codec benchmark: bytes, reconstruction error and throughput of fedmerge's delta codec.

``python -m bench codec [--quick]``. For a heavy-tailed delta (Student-t, 3 dof; the shape of real
fine-tuning deltas) and a real LoRA delta (peft on a tiny model), every density in {1, 5, 10, 30} %
and every value encoding: package bytes / dense fp32 bytes, relative L2 reconstruction error, and
encode / decode throughput in GB/s of dense fp32 input. Reference measured in the same run:
``torch.save`` of the dense fp16 tensors compressed with zstd level 3 (a standard fast compressor
that ships as a project dependency). Each configuration's encode and decode are timed interleaved
with the reference's, best of k (``bench.timing``); the load average is printed. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json

import torch
import zstandard
from rich.console import Console
from rich.table import Table

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package
from fedmerge.delta import SparseTensor
from fedmerge.v1 import delta_pb2
from fedmerge_bench.timing import best_of, interleaved, load_line

DENSITIES = (0.01, 0.05, 0.10, 0.20, 0.30)
VALUES = ("fp32", "fp16", "bf16", "int8", "int4")
META = PackageMeta("bench", 1, "v0", "0" * 64)


def heavy_tailed_delta(numel: int, seed: int) -> dict[str, torch.Tensor]:
    """A few transformer-like matrices with Student-t(3) entries and per-tensor scales."""
    g = torch.Generator().manual_seed(seed)
    side = int((numel // 4) ** 0.5)
    out = {}
    for i, scale in enumerate((1e-3, 3e-4, 2e-3, 5e-4)):
        normal = torch.randn(side, side, generator=g)
        chi2 = torch.randn(3, side, side, generator=g).pow(2).sum(0)
        out[f"layers.{i}.weight"] = normal / (chi2 / 3).sqrt() * scale
    return out


def lora_delta(seed: int) -> dict[str, torch.Tensor]:
    """ΔW of a real peft LoRA adapter (r = 16) on a tiny two-layer model."""
    from peft import LoraConfig, get_peft_model

    from fedmerge.delta.lora import LoraAdapter, LoraModule, lora_to_delta, scaling_for

    torch.manual_seed(seed)  # peft initialises from the global generator
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    peft_model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=["0", "1"], init_lora_weights=False)
    )
    modules = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            modules[name.removeprefix("base_model.model.") + ".weight"] = LoraModule(
                a, b * 0.01, scaling_for(32, 16)
            )
    return lora_to_delta(LoraAdapter(modules, 16, 32.0))


def _dense(t: torch.Tensor | SparseTensor) -> torch.Tensor:
    return t.to_dense() if isinstance(t, SparseTensor) else t


class Reference:
    """``torch.save`` of the fp16 tensors + zstd-3, and back; keeps its best times over every
    interleaved measurement of the run."""

    def __init__(self, delta: dict[str, torch.Tensor]) -> None:
        self.dense_bytes = 4 * sum(v.numel() for v in delta.values())
        self.half = {k: v.half() for k, v in delta.items()}
        self.blob = self.encode()
        self.enc_s = self.dec_s = float("inf")

    def encode(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.half, buf)
        return zstandard.ZstdCompressor(level=3).compress(buf.getvalue())

    def decode(self) -> object:
        return torch.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(self.blob)))

    def result(self) -> dict[str, float]:
        return {
            "frac": len(self.blob) / self.dense_bytes,
            "enc_gbps": self.dense_bytes / self.enc_s / 1e9,
            "dec_gbps": self.dense_bytes / self.dec_s / 1e9,
        }


def measure(
    delta: dict[str, torch.Tensor], cfg: CodecConfig, repeats: int, ref: Reference | None = None
) -> dict[str, float]:
    """Bytes, error and best-of-``repeats`` throughput; with ``ref``, each timing interleaved with it."""
    dense_bytes = 4 * sum(v.numel() for v in delta.values())
    result = encode_package(delta, cfg, meta=META)
    if ref is None:
        t_enc = best_of(lambda: encode_package(delta, cfg, meta=META), repeats)
        t_dec = best_of(lambda: decode_package(result.data), repeats)
    else:
        enc = interleaved(lambda: encode_package(delta, cfg, meta=META), ref.encode, repeats)
        dec = interleaved(lambda: decode_package(result.data), ref.decode, repeats)
        t_enc, t_dec = enc.ours_s, dec.ours_s
        ref.enc_s, ref.dec_s = min(ref.enc_s, enc.ref_s), min(ref.dec_s, dec.ref_s)
    decoded = decode_package(result.data)
    num = sum(float((_dense(decoded.tensors[k]) - v).pow(2).sum()) for k, v in delta.items())
    den = sum(float(v.pow(2).sum()) for v in delta.values())
    return {
        "frac": result.report.frac_of_fp32,
        "rel_err": (num / den) ** 0.5,
        "enc_gbps": dense_bytes / t_enc / 1e9,
        "dec_gbps": dense_bytes / t_dec / 1e9,
    }


def refuse_time_us() -> float:
    td = delta_pb2.TensorDelta(name="w", shape=[25_000_000_000], dtype="float32", nnz=25_000_000_000)
    td.value_encoding, td.index_encoding = delta_pb2.VALUE_ENCODING_FP32, delta_pb2.INDEX_ENCODING_DENSE
    pkg = delta_pb2.DeltaPackage(format_version=1, kind=delta_pb2.DELTA_KIND_TASK_VECTOR, tensors=[td])
    data = pkg.SerializeToString()

    def attempt() -> None:
        try:
            decode_package(data)
        except Exception:
            return

    return best_of(attempt, 50) * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench codec", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 M parameters, one repeat (about a minute)")
    parser.add_argument("--numel", type=int, default=None, help="parameters in the synthetic delta")
    parser.add_argument("--repeats", type=int, default=None, help="k of best-of-k (default 3, full 5)")
    args = parser.parse_args(argv)
    numel = args.numel or (4_000_000 if args.quick else 16_000_000)
    repeats = args.repeats or (3 if args.quick else 5)
    console = Console()
    console.log(load_line())
    delta = heavy_tailed_delta(numel, seed=0)
    n = sum(v.numel() for v in delta.values())
    encode_package({"warm": torch.randn(1000)}, CodecConfig(), meta=META)  # compile the numba kernels first

    table = Table(title=f"codec on a heavy-tailed delta of {n / 1e6:.1f} M parameters (GB/s of dense fp32)")
    for col in ("sparsify", "values", "bytes / fp32", "rel. L2 error", "encode GB/s", "decode GB/s"):
        table.add_column(col, justify="right")
    results: dict[tuple[float, str], dict[str, float]] = {}
    ref = Reference(delta)
    for density in DENSITIES:
        for values in VALUES:
            cfg = CodecConfig(density=density, values=values, error_feedback=False)  # type: ignore[arg-type]
            r = results[(density, values)] = measure(delta, cfg, repeats, ref)
            table.add_row(f"top-{density:.0%}", values, f"{r['frac']:.4f}", f"{r['rel_err']:.3f}",
                          f"{r['enc_gbps']:.2f}", f"{r['dec_gbps']:.2f}")  # fmt: skip
    ef = measure(delta, CodecConfig(density=0.1, values="int8", error_feedback=True), repeats, ref)
    table.add_row(
        "top-10% + EF",
        "int8",
        f"{ef['frac']:.4f}",
        f"{ef['rel_err']:.3f}",
        f"{ef['enc_gbps']:.2f}",
        f"{ef['dec_gbps']:.2f}",
    )
    rk = measure(
        delta, CodecConfig(sparsify="randomk", density=0.1, values="int8", error_feedback=False), repeats, ref
    )
    table.add_row(
        "random-10%",
        "int8",
        f"{rk['frac']:.4f}",
        f"{rk['rel_err']:.3f}",
        f"{rk['enc_gbps']:.2f}",
        f"{rk['dec_gbps']:.2f}",
    )
    base = ref.result()
    table.add_row(
        "zstd(torch.save fp16)",
        "fp16",
        f"{base['frac']:.4f}",
        "—",
        f"{base['enc_gbps']:.2f}",
        f"{base['dec_gbps']:.2f}",
    )
    console.print(table)
    console.print(load_line())

    lora = lora_delta(seed=0)
    lt = Table(title="real peft LoRA ΔW (2 × 512², r = 16)")
    for col in ("sparsify", "values", "bytes / fp32", "rel. L2 error"):
        lt.add_column(col, justify="right")
    lora_rows = {}
    for density in DENSITIES:
        r = lora_rows[density] = measure(
            lora, CodecConfig(density=density, values="int8", error_feedback=False), 1
        )
        lt.add_row(f"top-{density:.0%}", "int8", f"{r['frac']:.4f}", f"{r['rel_err']:.3f}")
    lb = Reference(lora).result()
    lt.add_row("zstd(torch.save fp16)", "fp16", f"{lb['frac']:.4f}", "—")
    console.print(lt)

    top10 = results[(0.10, "int8")]
    summary = {
        "numel": n,
        "top10_int8_frac_of_fp32": round(top10["frac"], 5),
        "top1_int8_frac_of_fp32": round(results[(0.01, "int8")]["frac"], 5),
        "top10_int8_rel_err": round(top10["rel_err"], 4),
        "encode_gbps": round(top10["enc_gbps"], 3),
        "decode_gbps": round(top10["dec_gbps"], 3),
        "top20_int4_encode_gbps": round(results[(0.20, "int4")]["enc_gbps"], 3),
        "top20_int4_decode_gbps": round(results[(0.20, "int4")]["dec_gbps"], 3),
        "encode_gbps_with_error_feedback": round(ef["enc_gbps"], 3),
        "top1_int8_encode_gbps": round(results[(0.01, "int8")]["enc_gbps"], 3),
        "top1_int8_decode_gbps": round(results[(0.01, "int8")]["dec_gbps"], 3),
        "baseline_zstd_fp16_frac_of_fp32": round(base["frac"], 5),
        "baseline_zstd_encode_gbps": round(base["enc_gbps"], 3),
        "baseline_zstd_decode_gbps": round(base["dec_gbps"], 3),
        "lora_top10_int8_frac_of_fp32": round(lora_rows[0.10]["frac"], 5),
        "lora_top10_int8_rel_err": round(lora_rows[0.10]["rel_err"], 4),
        "refuse_100gb_claim_us": round(refuse_time_us(), 1),
    }
    print(json.dumps(summary))
    return 0
