"""Package mutations and builders of bad payloads (re-signed so each reaches the check it targets)."""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedmerge.codec import CodecConfig, container
from fedmerge.codec.checksum import package_checksum, tensor_checksum
from fedmerge.v1 import delta_pb2

if TYPE_CHECKING:
    pass
from fedmerge_testing.hostile.data import Attack, HostileRunError, Valid

# ------------------------------------------------------------------------------------------ mutations


def resign(pkg: delta_pb2.DeltaPackage) -> None:
    """Recompute every tensor checksum and the package checksum of ``pkg`` in place."""
    for td in pkg.tensors:
        td.checksum = tensor_checksum(td)
    pkg.checksum = package_checksum(pkg)


def mutate(data: bytes, edit: Callable[[delta_pb2.DeltaPackage], None], *, sign: bool = True) -> bytes:
    """Parse ``data``, apply ``edit``, re-sign (unless ``sign`` is False) and serialize; a deflated
    package (``fedmerge.codec.container``) is edited inside and deflated again, as its sender would."""
    deflated = container.is_deflated(data)
    pkg = delta_pb2.DeltaPackage.FromString(container.inflated(data, container.MAX_INFLATED_BYTES))
    edit(pkg)
    if sign:
        resign(pkg)
    out = pkg.SerializeToString()
    return container.deflated(out) if deflated else out


def seeded_bytes(name: str, size: int) -> bytes:
    """``size`` pseudo-random bytes seeded by ``name`` (the same on every run)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return random.Random(seed).randbytes(size)


def synthetic_delta(
    base: Mapping[str, torch.Tensor], seed: int, scale: float = 1e-2
) -> dict[str, torch.Tensor]:
    """A small seeded task vector over the floating tensors of ``base``: τ = scale · N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: scale * torch.randn(tuple(t.shape), generator=g)
        for name, t in sorted(base.items())
        if t.is_floating_point()
    }


_COO = CodecConfig(sparsify="topk", density=0.25, values="fp32", index_coding="coo", error_feedback=False)
_FP32 = CodecConfig(sparsify="none", values="fp32", error_feedback=False)


def _first(pkg: delta_pb2.DeltaPackage, index: int) -> delta_pb2.TensorDelta:
    for td in pkg.tensors:
        if td.index_encoding == index:
            return td
    raise HostileRunError(f"no tensor with index encoding {index} in the package")


def _coo_edit(valid: Valid, edit: Callable[[np.ndarray, int], None]) -> bytes:
    def apply(pkg: delta_pb2.DeltaPackage) -> None:
        td = _first(pkg, delta_pb2.INDEX_ENCODING_COO_INT32)
        idx = np.frombuffer(td.indices, dtype="<i4").copy()
        edit(idx, math.prod(td.shape))
        td.indices = idx.astype("<i4").tobytes()

    return mutate(valid.encode(codec=_COO), apply)


def _largest(valid: Valid) -> str:
    return max(sorted(valid.delta), key=lambda n: valid.delta[n].numel())


def _set(msg: delta_pb2.DeltaPackage | delta_pb2.TensorDelta, **fields: Any) -> None:
    for key, value in fields.items():
        setattr(msg, key, value)


def _values_nan(pkg: delta_pb2.DeltaPackage) -> None:
    td = pkg.tensors[0]
    td.values = struct.pack("<f", float("nan")) + td.values[4:]


def _scale_inf(pkg: delta_pb2.DeltaPackage) -> None:
    td = next(t for t in pkg.tensors if t.block_scales)
    td.block_scales = struct.pack("<f", float("inf")) + td.block_scales[4:]


def _flip_value_byte(pkg: delta_pb2.DeltaPackage) -> None:
    td = next(t for t in pkg.tensors if t.values)
    td.values = bytes([td.values[0] ^ 0xFF]) + td.values[1:]


def _renamed(valid: Valid) -> dict[str, torch.Tensor]:
    name = _largest(valid)
    out = dict(valid.delta)
    out[name + ".evil"] = out.pop(name)
    return out


def _transposed(valid: Valid) -> dict[str, torch.Tensor]:
    name = next(
        n
        for n in sorted(valid.delta)
        if valid.delta[n].dim() == 2 and valid.delta[n].shape[0] != valid.delta[n].shape[1]
    )
    return {**valid.delta, name: valid.delta[name].t().contiguous()}


def _dense_weights(valid: Valid, delta: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Full weights θ₀ + τ (a tensor τ reshapes is sent in τ's shape)."""
    return {
        k: (v.reshape(delta[k].shape) + delta[k]).numpy() if k in delta else v.numpy()
        for k, v in valid.base.items()
    }


def _nan_delta(valid: Valid) -> dict[str, torch.Tensor]:
    name = _largest(valid)
    bad = valid.delta[name].clone()
    bad.view(-1)[0] = float("nan")
    return {**valid.delta, name: bad}


def _huge_header_checkpoint(valid: Valid) -> bytes:
    real = valid.checkpoint()
    return struct.pack("<Q", 1 << 62) + real[8:]


def _garbled_header_checkpoint(valid: Valid) -> bytes:
    real = valid.checkpoint()
    (n,) = struct.unpack("<Q", real[:8])
    return real[:8] + seeded_bytes("garbled-header", n) + real[8 + n :]


def _filled(valid: Valid, value: float) -> dict[str, torch.Tensor]:
    """Every tensor of the valid delta filled with ``value``."""
    return {k: torch.full_like(t, value) for k, t in valid.delta.items()}


def _dense_with_metrics(valid: Valid, metrics: Mapping[str, Any]) -> Attack:
    return Attack(reply="dense", dense=_dense_weights(valid, valid.delta), metrics=metrics)


def _huge_npy(valid: Valid) -> dict[str, tuple[list[int], bytes]]:
    """The largest tensor as an .npy array whose header declares shape (10**11,) over 16 data bytes."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }"
    header += " " * (118 - len(header)) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(16)
    return {_largest(valid): ([10**11], npy)}


def _lora_package(valid: Valid, *, drop: str = "", rank_a: int = 2) -> bytes:
    """A LoRA package (rank 2) for the first 2-D base weight; ``drop`` leaves out that factor,
    ``rank_a`` ≠ 2 makes lora_A's rank disagree with lora_B's."""
    name = next(k for k, t in sorted(valid.base.items()) if t.dim() == 2)
    out_f, in_f = valid.base[name].shape
    g = torch.Generator().manual_seed(5)
    module = "base_model.model." + name.removesuffix(".weight")
    factors = {
        module + ".lora_A.weight": 0.01 * torch.randn(rank_a, in_f, generator=g),
        module + ".lora_B.weight": 0.01 * torch.randn(out_f, 2, generator=g),
    }
    factors = {k: t for k, t in factors.items() if not drop or drop not in k}
    return valid.encode(delta=factors, meta=replace(valid.meta, kind="lora", lora_rank=2, lora_alpha=4.0))


def _reshape(pkg: delta_pb2.DeltaPackage) -> None:
    td = pkg.tensors[0]
    del td.shape[:]
    td.shape.extend([1 << 20, 1 << 20])


def _declaring(valid: Valid, codec: CodecConfig, numel: int = 1 << 28) -> bytes:
    """A one-tensor package (the first 2-D base tensor, a few kept values) whose header then declares
    shape ``[numel]``, re-signed: ~200 bytes that expand to ``4·numel`` bytes if decoded blindly."""
    name = next(k for k, t in sorted(valid.base.items()) if t.dim() == 2)
    tensor = torch.full(tuple(valid.base[name].shape), 0.25)
    if codec.sparsify != "randomk":
        tensor = torch.zeros_like(tensor)
        tensor.view(-1)[3] = 0.25
    data = valid.encode(delta={name: tensor}, codec=codec)

    def edit(pkg: delta_pb2.DeltaPackage) -> None:
        del pkg.tensors[0].shape[:]
        pkg.tensors[0].shape.append(numel)

    return mutate(data, edit)


_ONE_COO = CodecConfig(sparsify="topk", density=1e-3, values="fp32", index_coding="coo", error_feedback=False)
_RANDOMK = CodecConfig(sparsify="randomk", density=1 / 32, values="fp32", error_feedback=False, rescale=False)


def gnu_sparse_member(name: str, realsize: int, stored: bytes = b"\x01" * 512) -> bytes:
    """A GNU sparse (typeflag ``S``) tar member: ``stored`` bytes on the wire, ``realsize`` declared
    (one data region at its end; everything before it is a hole a naive extraction writes as zeros)."""
    hdr = bytearray(512)

    def put(offset: int, value: bytes) -> None:
        hdr[offset : offset + len(value)] = value

    put(0, name.encode())
    put(100, b"0000644\0")
    put(108, b"0000000\0")
    put(116, b"0000000\0")
    put(124, b"%011o\0" % len(stored))
    put(136, b"%011o\0" % 0)
    put(148, b" " * 8)
    hdr[156] = ord("S")
    put(257, b"ustar  \0")
    put(386, b"%011o\0" % (realsize - len(stored)))  # sparse map entry: (offset, numbytes)
    put(398, b"%011o\0" % len(stored))
    put(483, b"%011o\0" % realsize)
    put(148, b"%06o\0 " % sum(hdr))
    return bytes(hdr) + stored + b"\0" * (-len(stored) % 512)


def _peft_tar_with_sparse_weights(realsize: int) -> bytes:
    """A peft tar: a valid adapter_config.json, then adapter_model.safetensors as a GNU sparse member
    declaring ``realsize`` bytes (~3 KiB in all)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(_PEFT_CONFIG)
        tar.addfile(info, io.BytesIO(_PEFT_CONFIG))
        header_and_data = 512 * (1 + -(-info.size // 512))
    return (
        buf.getvalue()[:header_and_data]
        + gnu_sparse_member("adapter_model.safetensors", realsize)
        + b"\0" * 1024
    )


def _drop_from_checkpoint(valid: Valid) -> bytes:
    from safetensors.torch import save

    drop = _largest(valid)
    return save({k: (v + valid.delta[k]).contiguous() for k, v in valid.base.items() if k != drop})


def _peft_tar(config: bytes | None, weights: bytes | None = None) -> bytes:
    """A peft adapter tar for the intake's tiny base (LoRA r=2 on ``l1``): ``config`` as the
    adapter_config.json bytes, ``weights`` as adapter_model.safetensors (default: valid factors)."""
    import io
    import tarfile

    from safetensors.torch import save

    if weights is None:
        g = torch.Generator().manual_seed(5)
        weights = save(
            {
                "base_model.model.l1.lora_A.weight": torch.randn(2, 8, generator=g),
                "base_model.model.l1.lora_B.weight": torch.randn(32, 2, generator=g),
            }
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("adapter_config.json", config), ("adapter_model.safetensors", weights)):
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_PEFT_CONFIG = b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["l1"]}'
