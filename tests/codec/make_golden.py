"""Write the missing golden packages: ``python tests/codec/make_golden.py`` (when the package format changes).

Writes ``golden/NAME.bin`` (the encoded package) and ``golden/NAME.expected.safetensors`` (what it
decodes to, densified). Old golden files must keep decoding: never overwrite them for an existing
format version, add new ones instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package
from fedmerge.delta import SparseTensor

GOLDEN = Path(__file__).parent / "golden"
CASES: dict[str, CodecConfig] = {
    "v1_topk10_int8_auto": CodecConfig(density=0.1, values="int8", block_size=64),
    "v1_topk30_int4_bitmap": CodecConfig(density=0.3, values="int4", block_size=16, index_coding="bitmap"),
    "v1_topk5_fp16_varint": CodecConfig(density=0.05, values="fp16", index_coding="varint"),
    "v1_topk20_bf16_coo_global": CodecConfig(density=0.2, values="bf16", index_coding="coo", scope="global"),
    "v1_randomk30_int8": CodecConfig(sparsify="randomk", density=0.3, values="int8", seed=11),
    "v1_dense_fp32": CodecConfig(sparsify="none", values="fp32"),
    # package format 2: sign values, small tensors' checksums folded into the package checksum
    "v2_topk20_sign_auto": CodecConfig(density=0.2, values="sign", block_size=64),
    "v2_dense_fp32": CodecConfig(sparsify="none", values="fp32"),
    # package format 3: 2-D tensors as rank-r factor pairs (P ‖ Q), the bias top-k as before
    "v3_rank4_int4_topk20": CodecConfig(rank=4, density=0.2, values="int4", block_size=64),
    "v3_rank2_fp32": CodecConfig(rank=2, sparsify="none", values="fp32"),
}


def golden_delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    return {
        "layers.0.q_proj.weight": torch.randn(32, 24, generator=g) * 1e-3,
        "layers.0.q_proj.bias": torch.randn(32, generator=g) * 1e-3,
        "head.weight": torch.randn(10, 32, generator=g) * 1e-2,
    }


def golden_meta() -> PackageMeta:
    return PackageMeta(
        client_id="golden-client",
        round=3,
        base_version_id="v0007",
        base_version_hash="5e" * 32,
        num_examples=1234,
        metadata={"task": "golden", "optimizer": "adamw"},
    )


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, cfg in CASES.items():
        if (GOLDEN / f"{name}.bin").exists():  # written by the encoder of its format: kept as it is
            continue
        data = encode_package(golden_delta(), cfg, meta=golden_meta()).data
        decoded = decode_package(data)
        dense = {
            k: (v.to_dense() if isinstance(v, SparseTensor) else v).contiguous()
            for k, v in decoded.tensors.items()
        }
        (GOLDEN / f"{name}.bin").write_bytes(data)
        save_file(dense, str(GOLDEN / f"{name}.expected.safetensors"))
        print(name, len(data), "bytes")


if __name__ == "__main__":
    main()
