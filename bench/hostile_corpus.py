"""The hostile-input corpus: bad inputs for every entry point, as data, and the runners that send them.

Each :class:`HostileCase` names a class of bad input (:data:`CLASSES`), the entry points it applies to
(``flower``: the ServerApp's reply validation, ``intake``: the gRPC ``ExpertIntake`` service), what
each entry point is expected to answer (a regular expression over the error it gives), and a function
that builds the :class:`Attack` from a :class:`Valid` submission: the payload bytes plus how to send
them (token, stream framing, stalls...). Package mutations re-sign the checksums unless the case is
about checksums, so each reaches the check it targets instead of stopping at the checksum.

The runners send every case and observe (they assert nothing):

- :func:`run_flower_direct`: each reply through :meth:`fedmerge.flower.rounds.RoundState.judge`;
- :func:`run_flower_simulation`: one Flower simulation round, one hostile ClientApp per case beside
  honest ones; the round must commit from the honest replies;
- :func:`run_intake`: a real intake server process on localhost, one case after the other.

Every run yields :class:`Outcome` rows: the error returned, whether the server still served a valid
call, whether any stored version changed (manifest bytes and content hashes, see
:func:`store_snapshot`) and whether anything crashed. ``docs/hostile-input.md`` is their table
(``python -m bench hostile``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from fedmerge.codec import CodecConfig, PackageMeta, encode_package
from fedmerge.codec.checksum import package_checksum, tensor_checksum
from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.v1 import delta_pb2

if TYPE_CHECKING:
    import grpc
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp import ClientApp

EntryPoint = Literal["flower", "intake"]
ENTRY_POINTS: tuple[EntryPoint, ...] = ("flower", "intake")

CLASSES: dict[str, str] = {
    "truncated": "bytes cut short: a package or a stream that ends early",
    "random": "random bytes where a package, checkpoint or archive is expected",
    "magic/version": "wrong format version or wrong container (stype, safetensors header, format enum)",
    "nan/inf": "NaN or infinite values or block scales",
    "huge sizes": "declared sizes far above the limits: shape, nnz, name, header length, weight",
    "index range": "sparse indices outside the tensor",
    "duplicate indices": "the same index twice, or indices out of order",
    "shapes": "tensor shapes that differ from the base version's",
    "names": "unknown, missing or duplicated tensor names",
    "checksum": "payload bytes changed after the checksum was computed",
    "stale": "computed against another base version or for another round",
    "replay": "a submission sent again, identical",
    "oversized": "more bytes than the limits allow (declared, streamed or in one message)",
    "slow-loris": "a client that starts and then stalls",
    "unauthenticated": "a call without credentials",
    "wrong auth": "a wrong token, or a client claiming another client's identity",
    "framing": "stream framing: header not first, two headers, unknown format, bad hash fields, offsets",
    "crash": "a client that fails and replies with an error",
    "magnitude": "finite values above what the merge arithmetic can hold (e.g. all 3e38)",
    "metrics": "reply metrics of any type and value: num-examples NaN, inf, negative, fractional, missing",
    "completeness": "a submission that does not cover what its kind requires (no tensor, half a LoRA pair)",
    "merge failure": "an acknowledged expert the worker cannot convert (malformed peft config or weights)",
    "expansion": "a few hundred bytes that declare gigabytes (one COO entry or a random-k seed over "
    "shape [2^28], a sparse tar member declaring 1 GiB): refused on the declared size, nothing expanded",
}

KIB = 1 << 10
MIB = 1 << 20


class HostileRunError(FedMergeError, RuntimeError):
    """A hostile-input run could not be set up (server did not start, simulation failed...)."""


# ------------------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class Valid:
    """A valid submission for an entry point's current base, from which attacks are built.

    ``base``: the floating tensors of the base version; ``delta``: a valid task vector; ``meta``: its
    package metadata; ``codec``: how it is encoded; ``peer_data``: the package an honest peer sent
    (replays copy it) and ``peer_client_id`` the id it claims (impostors copy it);
    ``other_version``: a version id that is not the current base;
    ``limit_bytes``: the entry point's size limit for one submission.
    """

    base: Mapping[str, torch.Tensor]
    delta: Mapping[str, torch.Tensor]
    meta: PackageMeta
    codec: CodecConfig
    peer_data: bytes
    peer_client_id: str
    other_version: str
    limit_bytes: int

    def encode(
        self,
        *,
        delta: Mapping[str, torch.Tensor] | None = None,
        meta: PackageMeta | None = None,
        codec: CodecConfig | None = None,
    ) -> bytes:
        """The package of ``delta``/``meta``/``codec`` (each defaults to this submission's)."""
        return encode_package(
            dict(delta if delta is not None else self.delta),
            codec or self.codec,
            meta=meta or self.meta,
        ).data

    @property
    def data(self) -> bytes:
        return self.encode()

    def checkpoint(self, delta: Mapping[str, torch.Tensor] | None = None) -> bytes:
        """Full fine-tuned weights θ = θ₀ + τ as a safetensors file (the intake's ``checkpoint``)."""
        from safetensors.torch import save

        tau = delta if delta is not None else self.delta
        return save(
            {
                k: (v.reshape(tau[k].shape) + tau[k]).contiguous() if k in tau else v
                for k, v in self.base.items()
            }
        )


Reply = Literal["package", "dense", "error", "empty", "stype"]
Auth = Literal["valid", "none", "wrong"]
Framing = Literal["ok", "data-first", "second-header"]


@dataclass(frozen=True)
class Attack:
    """What a hostile client sends; fields an entry point does not use are ignored by it.

    Both: ``payload`` (package or expert bytes), ``stall_s`` (Flower: the reply comes this late;
    intake: the stream stalls after its first data chunk). Flower: ``reply`` (a package, full weights
    ``dense``, an ``error`` reply, an ``empty`` one, or the package under a wrong ``stype``).
    Intake: ``fmt``, ``auth``, ``header`` (SubmitHeader fields overriding the honest ones), whether
    to ``declare_sha``, ``chunk_size``, ``reorder`` (swap the first two chunks), ``framing``,
    ``bulk_offset`` (a BulkUpload at this wrong offset instead), ``streams`` (parallel stalls).
    """

    payload: bytes | None = None
    stall_s: float = 0.0
    reply: Reply = "package"
    dense: Mapping[str, np.ndarray] | None = None
    error: str = ""
    num_examples: int = 100
    metrics: Mapping[str, Any] | None = None  # Flower: the reply's whole MetricRecord, when given
    dense_npy: Mapping[str, tuple[list[int], bytes]] | None = None  # Flower: raw (shape, .npy bytes)
    fmt: str = "delta_package"
    auth: Auth = "valid"
    header: Mapping[str, Any] = field(default_factory=dict)
    declare_sha: bool = True
    chunk_size: int = 64 * KIB
    reorder: bool = False
    framing: Framing = "ok"
    bulk_offset: int | None = None
    streams: int = 1


@dataclass(frozen=True)
class HostileCase:
    """One bad input: ``expect[entry]`` is a regular expression the entry point's error must match;
    ``gaps[entry]`` names a defence that entry point lacks (the case then shows it)."""

    name: str
    klass: str
    description: str
    build: Callable[[Valid], Attack]
    expect: Mapping[EntryPoint, str]
    gaps: Mapping[EntryPoint, str] = field(default_factory=dict)

    @property
    def entry_points(self) -> tuple[EntryPoint, ...]:
        return tuple(e for e in ENTRY_POINTS if e in self.expect)

    def __post_init__(self) -> None:
        if self.klass not in CLASSES:
            raise ConfigError(f"case {self.name!r}: unknown class {self.klass!r}; add it to CLASSES")


# ------------------------------------------------------------------------------------------ mutations


def resign(pkg: delta_pb2.DeltaPackage) -> None:
    """Recompute every tensor checksum and the package checksum of ``pkg`` in place."""
    for td in pkg.tensors:
        td.checksum = tensor_checksum(td)
    pkg.checksum = package_checksum(pkg)


def mutate(data: bytes, edit: Callable[[delta_pb2.DeltaPackage], None], *, sign: bool = True) -> bytes:
    """Parse ``data``, apply ``edit``, re-sign (unless ``sign`` is False) and serialize."""
    pkg = delta_pb2.DeltaPackage.FromString(data)
    edit(pkg)
    if sign:
        resign(pkg)
    return pkg.SerializeToString()


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


# ------------------------------------------------------------------------------------------ the corpus

_MALFORMED = r"MalformedPackage|PayloadSizeMismatch|UnsupportedFormatVersion|bytes are not a fedmerge"
_UNAUTH = r"UNAUTHENTICATED"
_QUOTA = r"(FAILED_PRECONDITION|RESOURCE_EXHAUSTED)"  # a limit no retry can satisfy (or, older: quota)


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
_ACK_REFUSED = r"then (rejected|failed): "  # acknowledged, then set aside by the merge worker


CASES: tuple[HostileCase, ...] = (
    # -- truncated
    HostileCase(
        "truncated-half",
        "truncated",
        "the first half of a valid package",
        lambda v: Attack(v.data[: len(v.data) // 2]),
        {"flower": _MALFORMED, "intake": r"bytes are not a fedmerge\.v1\.DeltaPackage|payload is \d+ bytes"},
    ),
    HostileCase(
        "truncated-last-byte",
        "truncated",
        "a valid package without its last byte",
        lambda v: Attack(v.data[:-1]),
        {"flower": _MALFORMED + "|ChecksumMismatch", "intake": r"DeltaPackage|checksum|payload"},
    ),
    HostileCase(
        "truncated-stream",
        "truncated",
        "the header declares 2× the bytes the stream carries",
        lambda v: Attack(v.data, header={"total_size": 2 * len(v.data)}),
        {"intake": r"INVALID_ARGUMENT: received \d+ bytes but the header declared \d+"},
    ),
    HostileCase(
        "empty-payload",
        "truncated",
        "zero bytes",
        lambda v: Attack(b""),
        {
            "flower": r"UnsupportedFormatVersion: format_version 0",
            "intake": r"INVALID_ARGUMENT: .*total_size > 0",
        },
    ),
    # -- random
    HostileCase(
        "random-bytes",
        "random",
        "4 KiB of random bytes as a delta package",
        lambda v: Attack(seeded_bytes("random-bytes", 4 * KIB)),
        {"flower": _MALFORMED, "intake": r"bytes are not a fedmerge\.v1\.DeltaPackage|format_version"},
    ),
    HostileCase(
        "random-checkpoint",
        "random",
        "4 KiB of random bytes as a safetensors checkpoint",
        lambda v: Attack(seeded_bytes("random-checkpoint", 4 * KIB), fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    HostileCase(
        "random-peft-tar",
        "random",
        "4 KiB of random bytes as a peft adapter archive",
        lambda v: Attack(seeded_bytes("random-peft-tar", 4 * KIB), fmt="peft_tar"),
        {"intake": r"not an uncompressed tar archive|peft archive has no"},
    ),
    # -- magic / version
    HostileCase(
        "wrong-format-version",
        "magic/version",
        "format_version = 99, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p, format_version=99))),
        {
            "flower": r"UnsupportedFormatVersion: format_version 99",
            "intake": r"format_version 99 is not supported",
        },
    ),
    HostileCase(
        "wrong-stype",
        "magic/version",
        "the package in an Array of stype 'fedmerge-delta-v0'",
        lambda v: Attack(v.data, reply="stype"),
        {"flower": r"MissingPackage: .*stype 'fedmerge-delta-v0'"},
    ),
    HostileCase(
        "package-as-checkpoint",
        "magic/version",
        "a valid delta package declared as a checkpoint",
        lambda v: Attack(v.data, fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    HostileCase(
        "garbled-safetensors-header",
        "magic/version",
        "a checkpoint whose JSON header is random bytes",
        lambda v: Attack(_garbled_header_checkpoint(v), fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    HostileCase(
        "unknown-format",
        "framing",
        "SubmitHeader.format = 99",
        lambda v: Attack(v.data, header={"format": 99}),
        {"intake": r"INVALID_ARGUMENT: header\.format 99 is not a known ExpertFormat"},
    ),
    # -- NaN / Inf
    HostileCase(
        "nan-value",
        "nan/inf",
        "an fp32 value set to NaN, re-signed",
        lambda v: Attack(mutate(v.encode(codec=_FP32), _values_nan)),
        {"flower": r"NonFiniteValues: .*nan", "intake": r"value 0 of \d+ is nan"},
    ),
    HostileCase(
        "inf-block-scale",
        "nan/inf",
        "an int8 block scale set to +inf, re-signed",
        lambda v: Attack(mutate(v.encode(codec=replace(v.codec, values="int8")), _scale_inf)),
        {"flower": r"NonFiniteValues: .*block scale", "intake": r"block scale is NaN or infinite"},
    ),
    HostileCase(
        "nan-checkpoint",
        "nan/inf",
        "full weights with one NaN",
        lambda v: Attack(v.checkpoint(_nan_delta(v)), fmt="checkpoint"),
        {"intake": r"NaN or inf"},
    ),
    HostileCase(
        "nan-dense-reply",
        "nan/inf",
        "a plain Flower reply of full weights with one NaN",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, _nan_delta(v))),
        {"flower": r"PackageError: .*NaN or infinite"},
    ),
    # -- huge declared sizes
    HostileCase(
        "huge-shape",
        "huge sizes",
        "a tensor declaring shape (2^20, 2^20), re-signed",
        lambda v: Attack(mutate(v.data, _reshape)),
        {
            "flower": r"DeclaredSizeTooLarge: .*refused before allocation",
            "intake": r"refused before allocation",
        },
    ),
    HostileCase(
        "huge-nnz",
        "huge sizes",
        "nnz = 2^40 on a small tensor, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p.tensors[0], nnz=1 << 40))),
        {
            "flower": r"MalformedPackage: .*nnz = 1099511627776 is impossible",
            "intake": r"nnz = 1099511627776",
        },
    ),
    HostileCase(
        "huge-name",
        "huge sizes",
        "a tensor name of 5000 bytes, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p.tensors[0], name="n" * 5000))),
        {"flower": r"DeclaredSizeTooLarge: .*max_name_bytes", "intake": r"max_name_bytes"},
    ),
    HostileCase(
        "huge-num-examples",
        "huge sizes",
        "num_examples = 10^15 (to dominate the weighted merge)",
        lambda v: Attack(v.encode(meta=replace(v.meta, num_examples=10**15))),
        {"flower": r"StaleOrInvalid: num-examples=1000000000000000 .* is outside"},
    ),
    HostileCase(
        "huge-safetensors-header",
        "huge sizes",
        "a checkpoint declaring a 2^62-byte header",
        lambda v: Attack(_huge_header_checkpoint(v), fmt="checkpoint"),
        {"intake": r"checkpoint is not a readable safetensors file"},
    ),
    # -- indices
    HostileCase(
        "index-out-of-range",
        "index range",
        "the last coo index set to numel, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(-1, n))),
        {
            "flower": r"InvalidIndices: .*an index is outside \[0, \d+\)",
            "intake": r"an index is outside \[0, \d+\)",
        },
    ),
    HostileCase(
        "index-negative",
        "index range",
        "the first coo index set to -1, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(0, -1))),
        {
            "flower": r"InvalidIndices: .*an index is outside \[0, \d+\) \(first -1",
            "intake": r"an index is outside \[0, \d+\) \(first -1",
        },
    ),
    HostileCase(
        "duplicate-index",
        "duplicate indices",
        "coo index 1 equal to index 0, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(1, idx[0]))),
        {"flower": r"InvalidIndices: .*(increasing|duplicate)", "intake": r"increasing|duplicate"},
    ),
    HostileCase(
        "unsorted-indices",
        "duplicate indices",
        "two coo indices swapped, re-signed",
        lambda v: Attack(_coo_edit(v, lambda idx, n: idx.__setitem__(slice(0, 2), idx[1::-1].copy()))),
        {"flower": r"InvalidIndices: .*increasing", "intake": r"increasing"},
    ),
    # -- shapes and names
    HostileCase(
        "wrong-shape",
        "shapes",
        "a 2-D tensor sent transposed",
        lambda v: Attack(v.encode(delta=_transposed(v))),
        {
            "flower": r"TensorShapeMismatch: .*declares shape",
            "intake": r"tensor '[^']+': declares shape \(\d+, \d+\) but the base version has \(\d+, \d+\)",
        },
    ),
    HostileCase(
        "wrong-shape-checkpoint",
        "shapes",
        "full weights with one tensor transposed",
        lambda v: Attack(v.checkpoint(_transposed(v)), fmt="checkpoint"),
        {"intake": r"checkpoint tensor .* has shape"},
    ),
    HostileCase(
        "wrong-shape-dense-reply",
        "shapes",
        "a plain Flower reply of full weights, one tensor transposed",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, _transposed(v))),
        {"flower": r"TensorShapeMismatch: .*in the reply"},
    ),
    HostileCase(
        "unknown-name",
        "names",
        "a tensor renamed '<name>.evil'",
        lambda v: Attack(v.encode(delta=_renamed(v))),
        {
            "flower": r"TensorNameMismatch: .*not a tensor of the base",
            "intake": r"tensor '[^']+\.evil': is not a tensor of the base version",
        },
    ),
    HostileCase(
        "no-tensors",
        "completeness",
        "a task-vector package with every tensor left out, re-signed (partial deltas are zero change)",
        lambda v: Attack(mutate(v.data, lambda p: p.ClearField("tensors"))),
        {"flower": r"TensorNameMismatch: package holds no tensors", "intake": r"holds no tensors"},
    ),
    HostileCase(
        "duplicate-name",
        "names",
        "the second tensor renamed as the first, re-signed",
        lambda v: Attack(mutate(v.data, lambda p: _set(p.tensors[1], name=p.tensors[0].name))),
        {"flower": r"TensorNameMismatch: .*appears twice", "intake": r"appears twice"},
    ),
    HostileCase(
        "checkpoint-missing-tensor",
        "names",
        "full weights lacking one tensor",
        lambda v: Attack(_drop_from_checkpoint(v), fmt="checkpoint"),
        {"intake": r"checkpoint lacks base tensor"},
    ),
    # -- checksums
    HostileCase(
        "tampered-values",
        "checksum",
        "one value byte flipped after signing",
        lambda v: Attack(mutate(v.data, _flip_value_byte, sign=False)),
        {"flower": r"ChecksumMismatch", "intake": r"SHA-256 of the tensor does not match"},
    ),
    HostileCase(
        "tampered-header",
        "checksum",
        "format fields changed, package checksum left as it was",
        lambda v: Attack(mutate(v.data, lambda p: _set(p, round=p.round + 1), sign=False)),
        {"flower": r"ChecksumMismatch: package checksum", "intake": r"package checksum does not match"},
    ),
    HostileCase(
        "sha-mismatch",
        "checksum",
        "SubmitHeader.sha256 of other bytes",
        lambda v: Attack(v.data, header={"sha256": hashlib.sha256(b"other").hexdigest()}),
        {"intake": r"INVALID_ARGUMENT: payload hashes to .* but the header declared"},
    ),
    # -- stale
    HostileCase(
        "stale-base",
        "stale",
        "a package computed against another base version (id and hash)",
        lambda v: Attack(
            v.encode(meta=replace(v.meta, base_version_id=v.other_version, base_version_hash="0" * 64))
        ),
        {
            "flower": r"StaleOrInvalid: stale delta package: computed against base .*expected hash",
            "intake": r"stale delta package: computed against base .* this server merges onto base",
        },
    ),
    HostileCase(
        "stale-base-header",
        "stale",
        "SubmitHeader.base_version names a version that is not the base",
        lambda v: Attack(v.data, header={"base_version": v.other_version}),
        {"intake": r"expert was fine-tuned from|no committed version"},
    ),
    HostileCase(
        "unknown-base-header",
        "stale",
        "SubmitHeader.base_version = 'v999999'",
        lambda v: Attack(v.data, header={"base_version": "v999999"}),
        {"intake": r"no committed version 'v999999'"},
    ),
    HostileCase(
        "wrong-round",
        "stale",
        "a package for round + 7",
        lambda v: Attack(v.encode(meta=replace(v.meta, round=v.meta.round + 7))),
        {"flower": r"StaleOrInvalid: stale: package is for round"},
    ),
    HostileCase(
        "lora-kind",
        "stale",
        "a package of kind 'lora' where a task vector is expected",
        lambda v: Attack(v.encode(meta=replace(v.meta, kind="lora", lora_rank=4, lora_alpha=8.0))),
        {"flower": r"StaleOrInvalid: package kind 'lora'"},
    ),
    # -- replay
    HostileCase(
        "replay",
        "replay",
        "the exact bytes an honest client already submitted",
        lambda v: Attack(v.peer_data),
        {"flower": r"StaleOrInvalid: duplicate", "intake": r"duplicate of s-"},
    ),
    # -- oversized
    HostileCase(
        "oversized-package",
        "oversized",
        "a valid package padded past the size limit",
        lambda v: Attack(v.data + bytes(v.limit_bytes + 1 - len(v.data))),
        {
            "flower": r"StaleOrInvalid: package of \d+ bytes exceeds max-package-bytes",
            "intake": _QUOTA + r": expert of \d+ bytes exceeds the per-submission limit",
        },
    ),
    HostileCase(
        "declared-too-large",
        "oversized",
        "SubmitHeader.total_size = 2^40",
        lambda v: Attack(v.data, header={"total_size": 1 << 40}),
        {"intake": _QUOTA + r": expert of 1099511627776 bytes exceeds"},
    ),
    HostileCase(
        "more-than-declared",
        "oversized",
        "the stream carries 2× the declared total_size",
        lambda v: Attack(v.data + v.data, header={"total_size": len(v.data)}, declare_sha=False),
        {"intake": r"INVALID_ARGUMENT: received more than the declared total_size"},
    ),
    HostileCase(
        "message-too-large",
        "oversized",
        "one 3 MiB data message (the server takes 2 MiB messages)",
        lambda v: Attack(
            seeded_bytes("big", 3 * MIB),
            header={"total_size": v.limit_bytes},
            declare_sha=False,
            chunk_size=3 * MIB,
        ),
        {"intake": r"RESOURCE_EXHAUSTED|larger than max"},
    ),
    # -- slow-loris
    HostileCase(
        "slow-loris",
        "slow-loris",
        "one reply/stream that starts, then stalls",
        lambda v: Attack(v.data, stall_s=600.0),
        {
            "flower": r"timeout: no reply within round-deadline-s|expired due to its TTL",
            "intake": r"dropped by the server: DEADLINE_EXCEEDED: .*--stream-idle-timeout-s",
        },
    ),
    HostileCase(
        "slow-loris-pool",
        "slow-loris",
        "as many stalled streams as the server has handler threads",
        lambda v: Attack(v.data, stall_s=600.0, streams=-1),
        {"intake": r"dropped by the server: .*; still serving"},
    ),
    # -- authentication
    HostileCase(
        "no-token",
        "unauthenticated",
        "SubmitExpert without an authorization header",
        lambda v: Attack(v.data, auth="none"),
        {"intake": _UNAUTH + r": missing 'authorization: Bearer <token>'"},
    ),
    HostileCase(
        "wrong-token",
        "wrong auth",
        "SubmitExpert with an unknown bearer token",
        lambda v: Attack(v.data, auth="wrong"),
        {"intake": _UNAUTH + r": unknown bearer token"},
    ),
    # -- framing
    HostileCase(
        "data-first",
        "framing",
        "the first SubmitChunk carries data, not the header",
        lambda v: Attack(v.data, framing="data-first"),
        {"intake": r"INVALID_ARGUMENT: the first SubmitChunk must carry the header"},
    ),
    HostileCase(
        "second-header",
        "framing",
        "a second header after the first data chunk",
        lambda v: Attack(v.data, framing="second-header"),
        {"intake": r"INVALID_ARGUMENT: only the first SubmitChunk may carry a header"},
    ),
    HostileCase(
        "malformed-sha-field",
        "framing",
        "SubmitHeader.sha256 = 'not-a-sha'",
        lambda v: Attack(v.data, header={"sha256": "not-a-sha"}),
        {"intake": r"INVALID_ARGUMENT: 'not-a-sha' is not a lowercase sha256"},
    ),
    HostileCase(
        "chunks-reordered",
        "framing",
        "the first two 64-byte chunks swapped (sha256 declared)",
        lambda v: Attack(v.data, chunk_size=64, reorder=True),
        {"intake": r"INVALID_ARGUMENT: payload hashes to"},
    ),
    HostileCase(
        "chunks-reordered-unsigned",
        "framing",
        "the first two 64-byte chunks swapped, no sha256 declared",
        lambda v: Attack(v.data, chunk_size=64, reorder=True, declare_sha=False),
        {"intake": r"then rejected: .*(DeltaPackage|checksum|payload|indices|nnz)"},
    ),
    HostileCase(
        "bulk-wrong-offset",
        "framing",
        "BulkUpload.Upload starting at offset 7 instead of 0",
        lambda v: Attack(v.data, bulk_offset=7),
        {"intake": r"INVALID_ARGUMENT: .*chunk at offset 7, expected 0"},
    ),
    HostileCase(
        "bulk-unknown-object",
        "framing",
        "SubmitHeader.bulk_object naming an object never uploaded",
        lambda v: Attack(None, header={"bulk_object": hashlib.sha256(b"never uploaded").hexdigest()}),
        {"intake": r"INVALID_ARGUMENT: bulk object .* is not complete on this server"},
    ),
    # -- magnitude, metrics, completeness (Flower reply path and shared conversion)
    HostileCase(
        "huge-values",
        "magnitude",
        "a task-vector package whose values are all 3e38 (finite), num_examples 10^6",
        lambda v: Attack(v.encode(delta=_filled(v, 3e38), meta=replace(v.meta, num_examples=10**6))),
        {"flower": r"ValueOutOfBounds: .*above the bound", "intake": r"above the bound"},
    ),
    HostileCase(
        "huge-values-dense",
        "magnitude",
        "a plain Flower reply of full weights θ₀ + 3e38",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, _filled(v, 3e38))),
        {"flower": r"ValueOutOfBounds: .*above the bound"},
    ),
    *(
        HostileCase(
            f"dense-num-examples-{label}",
            "metrics",
            f"a plain Flower reply of valid full weights with MetricRecord num-examples = {label}",
            functools.partial(_dense_with_metrics, metrics=m),
            {"flower": r"StaleOrInvalid: (dense reply has no 'num-examples'|num-examples)"},
        )
        for label, m in (
            ("nan", {"num-examples": math.nan}),
            ("inf", {"num-examples": math.inf}),
            ("negative", {"num-examples": -5}),
            ("fractional", {"num-examples": 2.5}),
            ("list", {"num-examples": [1.0, 2.0]}),
            ("missing", {"loss": 0.1}),
        )
    ),
    HostileCase(
        "npy-huge-header",
        "huge sizes",
        "a plain Flower reply whose .npy header declares shape (10**11,) over 16 bytes of data",
        lambda v: Attack(reply="dense", dense=_dense_weights(v, v.delta), dense_npy=_huge_npy(v)),
        {"flower": r"TensorShapeMismatch: .*\(100000000000,\) in the reply"},
    ),
    HostileCase(
        "lora-b-only",
        "completeness",
        "a LoRA package with only lora_B factors",
        lambda v: Attack(_lora_package(v, drop="lora_A")),
        {"flower": r"StaleOrInvalid: package kind 'lora'", "intake": r"has lora_B but no lora_A"},
    ),
    HostileCase(
        "lora-task-vector-names",
        "completeness",
        "a LoRA package carrying task-vector tensor names",
        lambda v: Attack(v.encode(meta=replace(v.meta, kind="lora", lora_rank=2, lora_alpha=4.0))),
        {"flower": r"StaleOrInvalid: package kind 'lora'", "intake": r"is not a lora_A/lora_B factor"},
    ),
    HostileCase(
        "lora-rank-mismatch",
        "shapes",
        "a LoRA package whose lora_A has rank 3 and lora_B rank 2",
        lambda v: Attack(_lora_package(v, rank_a=3)),
        {
            "flower": r"StaleOrInvalid: package kind 'lora'",
            "intake": r"module .*lora_A .* has rank 3 but lora_B .* has rank 2",
        },
    ),
    # -- intake merge worker: acknowledged experts it cannot convert are set aside, never wedge it
    HostileCase(
        "peft-config-empty-object",
        "merge failure",
        "a peft adapter tar whose adapter_config.json is {}",
        lambda v: Attack(_peft_tar(b"{}"), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*adapter_config\.json"},
    ),
    HostileCase(
        "peft-config-json-list",
        "merge failure",
        "a peft adapter tar whose adapter_config.json is a JSON list",
        lambda v: Attack(_peft_tar(b"[" + _PEFT_CONFIG + b"]"), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*adapter_config\.json"},
    ),
    HostileCase(
        "peft-lora-alpha-object",
        "merge failure",
        "a peft adapter tar whose adapter_config.json has lora_alpha: {}",
        lambda v: Attack(
            _peft_tar(_PEFT_CONFIG.replace(b'"lora_alpha": 4', b'"lora_alpha": {}')), fmt="peft_tar"
        ),
        {"intake": _ACK_REFUSED + r".*lora_alpha"},
    ),
    HostileCase(
        "peft-weights-not-safetensors",
        "merge failure",
        "a peft adapter tar whose adapter_model.safetensors is not a safetensors file",
        lambda v: Attack(_peft_tar(_PEFT_CONFIG, seeded_bytes("peft-weights", 256)), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*not a safetensors file"},
    ),
    # -- expansion: tiny payloads that declare gigabytes
    HostileCase(
        "coo-one-entry-2^28",
        "expansion",
        "one COO entry in a tensor declaring shape [2^28] (~200 bytes; 1 GiB if expanded), re-signed",
        lambda v: Attack(_declaring(v, _ONE_COO)),
        {
            "flower": r"DeclaredSizeTooLarge: .*\(268435456,\).*refused before allocation",
            "intake": r"declares shape \(268435456,\).*refused before allocation",
        },
    ),
    HostileCase(
        "seeded-randomk-2^28",
        "expansion",
        "a random-k (seeded indices) tensor declaring shape [2^28] (~200 bytes), re-signed",
        lambda v: Attack(_declaring(v, _RANDOMK)),
        {
            "flower": r"DeclaredSizeTooLarge: .*\(268435456,\).*refused before allocation",
            "intake": r"declares shape \(268435456,\).*refused before allocation",
        },
    ),
    HostileCase(
        "peft-sparse-member-1GiB",
        "expansion",
        "a peft tar whose adapter_model.safetensors is a GNU sparse member declaring 1 GiB (3 KiB sent)",
        lambda v: Attack(_peft_tar_with_sparse_weights(1 << 30), fmt="peft_tar"),
        {"intake": _ACK_REFUSED + r".*is a sparse file \(declares 1073741824 bytes\)"},
    ),
    HostileCase(
        "bulk-sha-mismatch",
        "checksum",
        "SubmitHeader.bulk_object with a SubmitHeader.sha256 of other bytes",
        lambda v: Attack(
            None,
            header={
                "bulk_object": hashlib.sha256(v.data).hexdigest(),
                "sha256": hashlib.sha256(b"other").hexdigest(),
            },
        ),
        {"intake": r"INVALID_ARGUMENT: header\.sha256 [0-9a-f]{64} does not match the bulk object's hash"},
    ),
    # -- Flower reply shapes
    HostileCase(
        "client-error",
        "crash",
        "the ClientApp raises during training",
        lambda v: Attack(reply="error", error="hostile client crashed on purpose"),
        {"flower": r"client failed \(code \d+\): .*hostile client crashed on purpose"},
    ),
    HostileCase(
        "no-package",
        "truncated",
        "a reply with metrics but neither a package nor weights",
        lambda v: Attack(reply="empty"),
        {"flower": r"StaleOrInvalid: reply carries neither a fedmerge package"},
    ),
)


def case(name: str) -> HostileCase:
    """The case called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise ConfigError(f"no hostile case {name!r}; the names are those of CASES")


def cases_for(entry: EntryPoint) -> list[HostileCase]:
    """Every case that applies to ``entry``, in corpus order."""
    return [c for c in CASES if entry in c.expect]


# ------------------------------------------------------------------------------------------ outcomes


@dataclass
class Outcome:
    """What one case did at one entry point (observations only; no verdict beyond ``matches``).

    ``error``: the error the client got (gRPC ``CODE: details``) or the reason recorded for the
    submission; ``acknowledged``: the intake returned a submission id; ``merged``: the payload went
    into a version; ``serving``: a valid call succeeded right after; ``versions_unchanged``: no stored
    version changed and none was added by this case; ``crash``: an unexpected exception, an
    ``INTERNAL``/``UNKNOWN`` status, a dead server or an aborted round.
    """

    case: str
    klass: str
    entry: EntryPoint
    how: str
    sent: str
    error: str = ""
    acknowledged: bool = False
    merged: bool = False
    serving: bool = True
    versions_unchanged: bool = True
    crash: bool = False
    gap: str = ""
    expect: str = ""
    submission_id: str = ""
    seconds: float = 0.0

    @property
    def matches(self) -> bool:
        """The error matches the case's expectation."""
        return bool(self.expect) and re.search(self.expect, self.error, re.S) is not None

    @property
    def as_expected(self) -> bool:
        """The expected error, nothing merged, the server still serving, no version changed."""
        return (
            self.matches and self.serving and self.versions_unchanged and not self.merged and not self.crash
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "matches": self.matches, "as_expected": self.as_expected}


def store_snapshot(root: str | os.PathLike[str]) -> dict[str, str]:
    """Version id → ``content_hash`` + sha256 of its manifest file, plus ``@verify`` (the store's
    own re-hash of every blob and manifest) and the aliases: equal snapshots mean byte-identical
    versions."""
    from fedmerge.store import ModelStore

    out: dict[str, str] = {}
    with ModelStore.open(root) as store:
        for v in store.list():
            manifest = Path(root) / "manifests" / f"{v.id}.json"
            digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else "-"
            out[v.id] = f"{v.content_hash}/{digest}"
        out["@verify"] = "ok" if store.verify().ok else "FAILED"
        out["@aliases"] = json.dumps(store.aliases(), sort_keys=True)
    return out


def unchanged(
    before: Mapping[str, str], after: Mapping[str, str], allowed_new: set[str] | frozenset[str] = frozenset()
) -> bool:
    """Every version of ``before`` is byte-identical in ``after``, the store verifies, and no version
    was added except ``allowed_new`` (those made from valid submissions sent meanwhile)."""
    old = {k: v for k, v in before.items() if not k.startswith("@")}
    new = {k for k in after if not k.startswith("@")} - set(old)
    kept = all(after.get(k) == v for k, v in old.items())
    aliases_ok = bool(allowed_new) or before.get("@aliases") == after.get("@aliases")
    return kept and new <= set(allowed_new) and after.get("@verify") == "ok" and aliases_ok


# ------------------------------------------------------------------------------------------ Flower


STYPE_WRONG = "fedmerge-delta-v0"


def flower_content(attack: Attack) -> RecordDict:
    """The reply content a hostile ClientApp sends for ``attack`` (not for ``reply="error"``)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedmerge.flower.rounds import METRICS_RECORD
    from fedmerge.flower.transport import ARRAY_KEY, RECORD_KEY, package_to_record

    metrics = MetricRecord(
        {"num-examples": attack.num_examples} if attack.metrics is None else dict(attack.metrics)
    )
    if attack.reply == "package":
        content = package_to_record(attack.payload or b"")
    elif attack.reply == "stype":
        data = attack.payload or b""
        array = Array(dtype="uint8", shape=(len(data),), stype=STYPE_WRONG, data=data)
        content = RecordDict({RECORD_KEY: ArrayRecord({ARRAY_KEY: array})})
    elif attack.reply == "dense":
        weights = {k: Array(np.ascontiguousarray(v)) for k, v in (attack.dense or {}).items()}
        for k, (shape, npy) in (attack.dense_npy or {}).items():
            weights[k] = Array(dtype="float32", shape=tuple(shape), stype="numpy.ndarray", data=npy)
        content = RecordDict({"weights": ArrayRecord(weights)})
    elif attack.reply == "empty":
        content = RecordDict()
    else:
        raise HostileRunError(f"reply {attack.reply!r} has no content (error replies are raised)")
    content[METRICS_RECORD] = metrics
    return content


def train_message(node_id: int, round_: int = 1) -> Message:
    """A ``train`` message as the grid delivers it to ``node_id`` (the ``reply_to`` of a direct reply)."""
    from flwr.app import Metadata, RecordDict
    from flwr.app.message.message import make_message

    meta = Metadata(
        run_id=1,
        message_id=f"train-{round_}-{node_id}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(round_),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return make_message(meta, RecordDict())


def flower_reply(attack: Attack, message: Message) -> Message:
    """The reply ``message`` gets from a hostile client (an error reply for ``reply="error"``)."""
    from flwr.app import Error, Message

    if attack.reply == "error":
        return Message(Error(code=0, reason=f"HostileClientError: {attack.error}"), reply_to=message)
    return Message(flower_content(attack), reply_to=message)


class HostileClientError(FedMergeError, RuntimeError):
    """Raised on purpose by a hostile ClientApp (the ``client-error`` case)."""


def flower_valid(
    base: Mapping[str, torch.Tensor],
    *,
    partition: int,
    round_: int,
    base_id: str,
    base_hash: str,
    codec: CodecConfig,
    limit_bytes: int,
    num_examples: int = 100,
) -> Valid:
    """The valid submission of Flower partition ``partition`` (honest partitions 0 and 1 send exactly
    this; partition 0's package is the ``peer_data`` every case can replay)."""
    floating = {k: v for k, v in base.items() if v.is_floating_point()}

    def meta_of(p: int) -> PackageMeta:
        return PackageMeta(
            f"honest-{p}" if p < 2 else f"hostile-{p}", round_, base_id, base_hash, num_examples=num_examples
        )

    peer = encode_package(synthetic_delta(floating, 0), codec, meta=meta_of(0)).data
    return Valid(
        base=floating,
        delta=synthetic_delta(floating, partition),
        meta=meta_of(partition),
        codec=codec,
        peer_data=peer,
        peer_client_id="honest-0",
        other_version="v000000",
        limit_bytes=limit_bytes,
    )


def _node_config(message: Message, context: Context) -> tuple[dict[str, torch.Tensor], Any]:
    """(base weights, train instructions) of a fedmerge ``train`` message, read the way the fedmerge
    client library reads them (Flower's ``config`` plus ``fedmerge.config``; weights from ``arrays``
    or the node's cache)."""
    from fedmerge.flower.client import TrainInstructions, base_weights, message_settings

    conf = TrainInstructions.from_record(message_settings(message.content))
    weights = dict(base_weights(message, context))
    return weights, conf


def hostile_client_app(plan: Sequence[str], workdir: str, limit_bytes: int) -> ClientApp:
    """Partition p replies as ``plan[p]``: ``honest`` (a valid synthetic delta), ``train`` (the real
    fedmerge ClientApp) or a case name. Each node writes its id to ``workdir/nodes/<node_id>`` so
    outcomes can be mapped back to partitions; a stalled node returns once ``workdir/round-done``
    exists (its reply is then too late)."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        (Path(workdir) / "nodes").mkdir(exist_ok=True)
        (Path(workdir) / "nodes" / str(context.node_id)).write_text(
            f"{partition} {time.time()} {message.metadata.created_at}"
        )
        role = plan[partition]
        if role == "train":
            from fedmerge_clients.app import train_reply

            return train_reply(message, context)
        weights, conf = _node_config(message, context)
        valid = flower_valid(
            weights,
            partition=partition,
            round_=conf.round,
            base_id=conf.base_version_id,
            base_hash=conf.base_version_hash,
            codec=conf.codec,
            limit_bytes=limit_bytes,
        )
        if role == "honest":
            return Message(flower_content(Attack(valid.data)), reply_to=message)
        attack = case(role).build(valid)
        if attack.stall_s > 0:
            done = Path(workdir) / "round-done"  # past the message's TTL the reply is too late anyway
            end = min(time.time() + attack.stall_s, message.metadata.created_at + message.metadata.ttl + 2.0)
            while not done.exists() and time.time() < end:
                time.sleep(0.1)
        if attack.reply == "error":
            raise HostileClientError(attack.error)
        return Message(flower_content(attack), reply_to=message)

    return app


FLOWER_DIRECT_CONFIG: dict[str, Any] = {
    "min-clients": 2,
    "min-valid": 2,
    "max-package-bytes": MIB,
    "codec-density": 0.1,
    "codec-values": "int8",
    "server-eval": False,
}


def _digits_base(seed: int) -> dict[str, torch.Tensor]:
    from fedmerge_simulations.tasks import get_task

    return get_task("digits").pretrained_base(seed)


def mlp_base(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small seeded MLP (64 → 48 → 10) as the base of direct Flower rounds (no task import)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (48, 64), "fc1.bias": (48,), "fc2.weight": (10, 48), "fc2.bias": (10,)}
    return {name: 0.1 * torch.randn(shape, generator=g) for name, shape in shapes.items()}


@dataclass
class FlowerRound:
    """Round 1 of a Flower federation on a small MLP base in a real store, for direct judging:
    :meth:`state` is a fresh :class:`~fedmerge.flower.rounds.RoundState`, :meth:`valid` partition
    ``p``'s valid submission and :meth:`reply` a reply to a ``train`` message."""

    root: Path
    cfg: Any
    base: Any
    weights: dict[str, torch.Tensor]

    @staticmethod
    def open(root: str | os.PathLike[str], **overrides: Any) -> FlowerRound:
        from fedmerge.flower.config import parse_run_config
        from fedmerge.flower.rounds import ensure_base
        from fedmerge.store import ModelStore

        cfg = parse_run_config({**FLOWER_DIRECT_CONFIG, **overrides, "store": str(root)})
        with ModelStore.open(root) as store:
            base = ensure_base(store, lambda: mlp_base(cfg.seed), name="mlp")
            weights = store.materialize(base)
        return FlowerRound(Path(root), cfg, base, weights)

    def state(self) -> Any:
        from fedmerge.flower.rounds import RoundState

        return RoundState(self.cfg, 1, self.base, self.weights)

    def valid(self, partition: int) -> Valid:
        return flower_valid(
            self.weights,
            partition=partition,
            round_=1,
            base_id=self.base.id,
            base_hash=self.base.content_hash,
            codec=self.cfg.codec(),
            limit_bytes=self.cfg.max_package_bytes,
        )

    def reply(self, attack: Attack, node_id: int = 1) -> Message:
        return flower_reply(attack, train_message(node_id))


def run_flower_direct(
    workdir: str | os.PathLike[str], cases: Sequence[HostileCase] | None = None
) -> tuple[list[Outcome], dict[str, Any]]:
    """Judge every Flower case's reply with :class:`RoundState` (after two honest replies), then fold
    the honest ones into a fresh state: returns the outcomes and ``{"merged_equal": ...,
    "accepted": [...], "reference_s": ...}`` (whether the hostile replies left the merge exactly as
    the honest ones make it; the time to judge one valid reply). Cases that need time (stalls) are
    skipped here (see :func:`run_flower_simulation`)."""
    cases = [c for c in (cases or cases_for("flower")) if "flower" in c.expect]
    fr = FlowerRound.open(Path(workdir) / "flower-direct-store")
    root, valid_for = fr.root, fr.valid
    before = store_snapshot(root)

    def message() -> Message:
        return train_message(1)

    state = fr.state()
    honest = [state.judge(0, flower_reply(Attack(valid_for(0).data), message()))]  # also compiles kernels
    t0 = time.perf_counter()
    honest.append(state.judge(1, flower_reply(Attack(valid_for(1).data), message())))
    reference_s = time.perf_counter() - t0
    outcomes: list[Outcome] = []
    for i, c in enumerate(cases):
        out = Outcome(
            c.name,
            c.klass,
            "flower",
            "direct",
            c.description,
            expect=c.expect["flower"],
            gap=c.gaps.get("flower", ""),
        )
        attack = c.build(valid_for(2 + i))
        if attack.stall_s > 0:
            out.how = "simulation only"
            out.error = "(needs a round deadline: see the simulation row)"
            outcomes.append(out)
            continue
        reply = flower_reply(attack, message())
        t0 = time.perf_counter()
        try:
            result = state.judge(100 + i, reply)
        except Exception as exc:  # observed, not hidden: the judge must never raise
            out.crash, out.error = True, f"judge raised {type(exc).__name__}: {exc}"
        else:
            out.merged = result.accepted
            out.error = result.reason or "(accepted)"
        out.seconds = time.perf_counter() - t0
        outcomes.append(out)
    merged = state.aggregator.finalize()
    clean = fr.state()
    for p in (0, 1):
        clean.judge(p, flower_reply(Attack(valid_for(p).data), message()))
    reference = clean.aggregator.finalize()
    equal = set(merged) == set(reference) and all(torch.equal(merged[k], reference[k]) for k in merged)
    after = store_snapshot(root)
    same = unchanged(before, after)
    for out in outcomes:
        out.versions_unchanged = same and not out.merged
    info = {
        "merged_equal": equal,
        "accepted": [o.client_id for o in honest if o.accepted],
        "reference_s": reference_s,
    }
    return outcomes, info


def run_flower_simulation(
    workdir: str | os.PathLike[str],
    cases: Sequence[HostileCase] | None = None,
    *,
    honest: int = 2,
    train: bool = True,
    deadline_s: float = 20.0,
) -> tuple[list[Outcome], dict[str, Any]]:
    """One Flower simulation round: ``honest`` synthetic honest clients (plus one real training client
    when ``train``) and one hostile ClientApp per case. Returns the outcomes and a summary (report,
    accepted client ids, the snapshot check, wall time)."""
    import warnings

    from flwr.simulation import run_simulation

    from fedmerge.flower.rounds import RoundAborted, RoundReport
    from fedmerge.store import ModelStore
    from fedmerge_server.app import make_server_app

    cases = [c for c in (cases or cases_for("flower")) if "flower" in c.expect]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    root = work / "flower-sim-store"
    with ModelStore.open(root) as store:
        if not store.list(limit=1):
            store.commit_base(_digits_base(0), name="digits")
    before = store_snapshot(root)
    plan = ["honest"] * honest + (["train"] if train else []) + [c.name for c in cases]
    n_good = honest + int(train)
    reports: list[RoundReport] = []
    done = work / "round-done"
    done.unlink(missing_ok=True)

    def on_round(report: RoundReport) -> None:
        reports.append(report)
        done.write_text(str(report.version_id))

    config = {
        "store": str(root),
        "num-rounds": 1,
        "local-epochs": 1,
        "lr": 0.05,
        "server-eval": True,
        "min-clients": len(plan),
        "min-valid": n_good,
        "max-retries": 0,
        "round-deadline-s": deadline_s,
        "max-package-bytes": MIB,
    }
    t0 = time.perf_counter()
    aborted = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_simulation(
                make_server_app(config, on_round=on_round),
                hostile_client_app(plan, str(work), MIB),
                num_supernodes=len(plan),
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
            )
        except RoundAborted as exc:  # pragma: no cover - observed and reported
            aborted = str(exc)
    wall = time.perf_counter() - t0
    nodes = (
        {int(p.name): int(p.read_text().split()[0]) for p in (work / "nodes").glob("*")}
        if (work / "nodes").exists()
        else {}
    )
    after = store_snapshot(root)
    base_ids = [k for k in before if not k.startswith("@")]
    kept = all(after.get(k) == before[k] for k in base_ids) and after.get("@verify") == "ok"
    report = reports[-1] if reports else None
    committed = report is not None and report.version_id is not None
    by_partition = {nodes.get(o.node_id, -1): o for o in (report.outcomes if report else [])}
    outcomes: list[Outcome] = []
    for i, c in enumerate(cases):
        o = by_partition.get(n_good + i)
        out = Outcome(
            c.name,
            c.klass,
            "flower",
            "simulation",
            c.description,
            expect=c.expect["flower"],
            gap=c.gaps.get("flower", ""),
        )
        if o is None:
            out.error = "no outcome recorded" + (f" (round aborted: {aborted})" if aborted else "")
            out.crash = True
        else:
            out.error = o.reason or "(accepted)"
            out.merged = o.accepted
        out.serving = committed
        out.versions_unchanged = kept and not out.merged
        out.crash = out.crash or bool(aborted)
        outcomes.append(out)
    accepted = sorted(o.client_id for o in report.accepted) if report else []
    summary = {
        "committed": report.version_id if report else None,
        "accepted": accepted,
        "honest_partitions": list(range(n_good)),
        "outcome_partitions": {
            nodes.get(o.node_id, -1): o.accepted for o in (report.outcomes if report else [])
        },
        "partition_reasons": {
            nodes.get(o.node_id, -1): o.reason for o in (report.outcomes if report else []) if o.reason
        },
        "earlier_versions_unchanged": kept,
        "aborted": aborted,
        "wall_s": wall,
        "store": str(root),
    }
    return outcomes, summary


# ------------------------------------------------------------------------------------------ intake


TOKENS: dict[str, str] = {f"hostile-token-{i:02d}-xxxxxxxxxxxx": f"client-{i:02d}" for i in range(8)}
TOKEN = next(iter(TOKENS))
WRONG_TOKEN = "not-a-token-of-this-server-xxxx"
INTAKE_LIMIT = MIB
INTAKE_MESSAGE_LIMIT = 2 * MIB
INTAKE_WORKERS = 8
# serve-continual options of the intake runs: stalled streams are dropped after 1 s of silence
INTAKE_SERVER_ARGS = ("--stream-idle-timeout-s", "1")


def tiny_base(seed: int = 0, width: int = 32) -> dict[str, torch.Tensor]:
    """A tiny seeded two-layer model (plus an integer buffer) as the intake's base version."""
    g = torch.Generator().manual_seed(seed)
    return {
        "l1.weight": torch.randn(width, 8, generator=g),
        "l1.bias": torch.randn(width, generator=g),
        "l2.weight": torch.randn(4, width, generator=g),
        "l2.bias": torch.randn(4, generator=g),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


class IntakeProcess:
    """``python -m fedmerge.service.cli serve-continual`` on a fresh store under ``workdir``."""

    def __init__(
        self, workdir: str | os.PathLike[str], *extra: str, max_workers: int = INTAKE_WORKERS
    ) -> None:
        from fedmerge.store import ModelStore

        self.dir = Path(workdir)
        self.store = self.dir / "store"
        self.dir.mkdir(parents=True, exist_ok=True)
        with ModelStore.open(self.store) as s:
            if not s.list(limit=1):
                s.commit_base(tiny_base(), name="tiny")
        self.tokens = self.dir / "tokens.txt"
        self.tokens.write_text("".join(f"{c} {t}\n" for t, c in TOKENS.items()))
        self.log = self.dir / "server.log"
        self.extra = extra
        self.max_workers = max_workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> int:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "fedmerge.service.cli",
            "serve-continual",
            "--store",
            str(self.store),
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            str(self.tokens),
            "--port-file",
            str(port_file),
            "--max-submission-bytes",
            str(INTAKE_LIMIT),
            "--max-message-bytes",
            str(INTAKE_MESSAGE_LIMIT),
            "--max-workers",
            str(self.max_workers),
            *self.extra,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HostileRunError(f"intake server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def __enter__(self) -> IntakeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def channel(target: str) -> grpc.Channel:
    import grpc

    opts = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    return grpc.insecure_channel(target, options=opts)


def metadata(auth: Auth, token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    if auth == "none":
        return ()
    return (("authorization", f"Bearer {WRONG_TOKEN if auth == 'wrong' else token}"),)


def submit_messages(attack: Attack, label: str = "") -> list[Any]:
    """The SubmitChunk stream of ``attack``: header (with overrides), data chunks, framing faults."""
    from fedmerge.service.client import FORMATS
    from fedmerge.v1 import intake_pb2

    data = attack.payload or b""
    header = intake_pb2.SubmitHeader(
        format=FORMATS[attack.fmt],
        total_size=len(data),
        sha256=hashlib.sha256(data).hexdigest() if attack.declare_sha and data else "",
        label=label,
    )
    for key, value in attack.header.items():
        setattr(header, key, value)
    chunks = [data[i : i + attack.chunk_size] for i in range(0, len(data), attack.chunk_size)]
    if attack.reorder and len(chunks) >= 2:
        chunks[0], chunks[1] = chunks[1], chunks[0]
    msgs = [intake_pb2.SubmitChunk(header=header)] + [intake_pb2.SubmitChunk(data=c) for c in chunks]
    if attack.framing == "data-first":
        msgs.insert(0, intake_pb2.SubmitChunk(data=chunks[0] if chunks else b"x"))
    elif attack.framing == "second-header":
        msgs.insert(2, intake_pb2.SubmitChunk(header=header))
    return msgs


@dataclass
class Sent:
    """The direct answer to one intake call: a SubmitReply, or a gRPC status and its details."""

    ok: bool
    code: str = "OK"
    details: str = ""
    submission_id: str = ""
    duplicate: bool = False

    @property
    def text(self) -> str:
        if self.ok:
            return f"acknowledged {self.submission_id}" + (" (duplicate)" if self.duplicate else "")
        return f"{self.code}: {self.details}"


def send(target: str, attack: Attack, *, label: str = "", token: str = TOKEN, timeout: float = 60.0) -> Sent:
    """Send ``attack`` to the intake at ``target`` (SubmitExpert, or BulkUpload for ``bulk_offset``)."""
    import grpc

    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    md = metadata(attack.auth, token)
    with channel(target) as ch:
        try:
            if attack.bulk_offset is not None:
                data = attack.payload or b""
                sha = hashlib.sha256(data).hexdigest()
                bulk = intake_pb2_grpc.BulkUploadStub(ch)
                bulk.Begin(
                    intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(data)),
                    metadata=md,
                    timeout=timeout,
                )
                chunk = intake_pb2.BulkChunk(sha256=sha, offset=attack.bulk_offset, data=data)
                status = bulk.Upload(iter([chunk]), metadata=md, timeout=timeout)
                return Sent(True, details=f"offset {status.offset}")
            reply = intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
                iter(submit_messages(attack, label)), metadata=md, timeout=timeout
            )
            return Sent(True, submission_id=reply.submission_id, duplicate=reply.duplicate)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return Sent(False, code.name if code is not None else "UNKNOWN", details or "")


class Stall:
    """A SubmitExpert stream that sends its header and first data chunk, then waits until
    :meth:`release` (or the server ends the call). ``done()``: whether the call has ended."""

    def __init__(self, target: str, attack: Attack, *, label: str = "stall") -> None:
        from fedmerge.v1 import intake_pb2_grpc

        self._go = threading.Event()
        msgs = submit_messages(replace(attack, chunk_size=max(1, len(attack.payload or b"x") // 2)), label)
        self._channel = channel(target)

        def stream() -> Iterator[Any]:
            yield from msgs[:2]
            self._go.wait()

        stub = intake_pb2_grpc.ExpertIntakeStub(self._channel)
        self.future = stub.SubmitExpert.future(stream(), metadata=metadata(attack.auth))

    def done(self) -> bool:
        return bool(self.future.done())

    def answer(self) -> str:
        """The call's status once it ended (``CODE: details``), or ``running``."""
        if not self.future.done():
            return "running"
        exc = self.future.exception()
        if exc is None:
            return "OK"
        return f"{exc.code().name}: {exc.details()}"

    def release(self) -> None:
        self.future.cancel()
        self._go.set()
        self._channel.close()


def serving(target: str, timeout: float = 5.0) -> bool:
    """Whether the intake answers a valid ListVersions within ``timeout`` seconds."""
    import grpc

    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    with channel(target) as ch:
        try:
            intake_pb2_grpc.ExpertIntakeStub(ch).ListVersions(
                intake_pb2.ListVersionsRequest(limit=1), metadata=metadata("valid"), timeout=timeout
            )
            return True
        except grpc.RpcError:
            return False


def settle(
    target: str, submission_id: str, timeout: float = 30.0, *, token: str = TOKEN
) -> tuple[str, str, str]:
    """(state, version, reason) of a submission once merged or rejected (``queued`` at the timeout,
    ``unknown`` when the server does not know the id — or when ``token``'s client did not submit it:
    a client reads only its own submissions)."""
    import grpc

    from fedmerge.service.client import STATE_NAMES
    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    end = time.monotonic() + timeout
    request = intake_pb2.GetSubmissionRequest(submission_id=submission_id)
    with channel(target) as ch:
        stub = intake_pb2_grpc.ExpertIntakeStub(ch)
        while True:
            try:
                sub = stub.GetSubmission(request, metadata=metadata("valid", token), timeout=5.0)
                state = STATE_NAMES.get(sub.state, "queued")
                if state != "queued" or time.monotonic() > end:
                    return state, sub.version, sub.reason
            except grpc.RpcError:
                if time.monotonic() > end:
                    return "unknown", "", ""
            time.sleep(0.05)


@functools.lru_cache(maxsize=8)
def _intake_root(store: str) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(id, content hash, floating weights) of the store's root version; roots never change."""
    from fedmerge.store import ModelStore

    with ModelStore.open(store) as s:
        root = s.get("v000001")
        weights = s.materialize(root)
    return root.id, root.content_hash, {k: v for k, v in weights.items() if v.is_floating_point()}


def intake_valid(store: Path, seed: int, peer_data: bytes = b"", other_version: str = "v000000") -> Valid:
    """A valid delta package (seeded by ``seed``) for the intake's base, the store's root version."""
    root_id, root_hash, floating = _intake_root(str(Path(store).resolve()))
    meta = PackageMeta("expert", 0, root_id, root_hash, num_examples=10)
    delta = synthetic_delta(floating, seed, scale=0.05)
    codec = CodecConfig(density=0.5, values="int8")
    data = encode_package(delta, codec, meta=meta).data
    return Valid(floating, delta, meta, codec, peer_data or data, "client-00", other_version, INTAKE_LIMIT)


def run_intake(
    workdir: str | os.PathLike[str],
    cases: Sequence[HostileCase] | None = None,
    *,
    stall_s: float = 3.0,
    server_args: Sequence[str] = INTAKE_SERVER_ARGS,
) -> tuple[list[Outcome], dict[str, Any]]:
    """Every intake case against one real server process: a valid expert first (the replay target and
    the 'other' version), then the corpus (each case: send, settle if acknowledged, check the server
    still serves and no version changed), then a second valid expert. Returns the outcomes and a
    summary (valid submissions, every acknowledged id with its final state, lost acknowledged)."""
    cases = [c for c in (cases or cases_for("intake")) if "intake" in c.expect]
    work = Path(workdir)
    outcomes: list[Outcome] = []
    acknowledged: dict[str, str] = {}
    with IntakeProcess(work, *server_args) as srv:
        first = intake_valid(srv.store, seed=1)
        t0 = time.perf_counter()
        sent = send(srv.target, Attack(first.data), label="valid-1")
        if not sent.ok:
            raise HostileRunError(f"the valid expert was refused: {sent.text}")
        state, other, reason = settle(srv.target, sent.submission_id)
        reference_s = time.perf_counter() - t0
        if state != "merged":
            raise HostileRunError(f"the valid expert was not merged: {state} {reason}")
        acknowledged[sent.submission_id] = "valid-1"
        for i, c in enumerate(cases):
            # distinct bytes per case: the intake deduplicates by content, whatever the header says
            valid = intake_valid(srv.store, seed=10 + i, peer_data=first.data, other_version=other)
            out = Outcome(
                c.name,
                c.klass,
                "intake",
                "grpc",
                c.description,
                expect=c.expect["intake"],
                gap=c.gaps.get("intake", ""),
            )
            attack = c.build(valid)
            before = store_snapshot(srv.store)
            allowed: set[str] = set()
            t0 = time.perf_counter()
            if attack.stall_s > 0:
                allowed = _stall(srv, attack, out, stall_s, seed=1000 + i)
            else:
                result = send(srv.target, attack, label=c.name)
                out.error = result.text
                out.acknowledged = result.ok and attack.bulk_offset is None
                out.crash = result.code in ("INTERNAL", "UNKNOWN")
                if out.acknowledged:
                    out.submission_id = result.submission_id
                    acknowledged.setdefault(result.submission_id, c.name)
                    state, version, reason = settle(srv.target, result.submission_id)
                    out.merged = state == "merged" and not result.duplicate
                    if result.duplicate:
                        out.error = (
                            f"acknowledged as duplicate of {result.submission_id} ({state} in {version})"
                        )
                    else:
                        out.error = f"acknowledged {result.submission_id}, then {state}: {reason or version}"
                out.seconds = time.perf_counter() - t0
                out.serving = srv.alive() and serving(srv.target)
            after = store_snapshot(srv.store)
            out.versions_unchanged = unchanged(before, after, allowed_new=allowed)
            out.crash = out.crash or not srv.alive()
            outcomes.append(out)
        last = intake_valid(srv.store, seed=3)
        sent = send(srv.target, Attack(last.data), label="valid-2")
        final_state = settle(srv.target, sent.submission_id)[0] if sent.ok else sent.text
        if sent.ok:
            acknowledged.setdefault(sent.submission_id, "valid-2")
        states = {sid: settle(srv.target, sid, timeout=10.0) for sid in acknowledged}
        alive = srv.alive()
        final = store_snapshot(srv.store)
    lost = [
        sid
        for sid, (state, _, reason) in states.items()
        if state not in ("merged", "rejected") or (state == "rejected" and not reason)
    ]
    summary = {
        "reference_s": reference_s,
        "valid_after_corpus": final_state,
        "server_alive": alive,
        "acknowledged": {
            sid: {"case": acknowledged[sid], "state": s, "version": v, "reason": r}
            for sid, (s, v, r) in states.items()
        },
        "lost_acknowledged": lost,
        "verify": final.get("@verify"),
        "store": str(work / "store"),
    }
    return outcomes, summary


def _stall(srv: IntakeProcess, attack: Attack, out: Outcome, stall_s: float, seed: int) -> set[str]:
    """Open the stalled stream(s); within ``stall_s`` seconds send a valid expert from another client
    and a ListVersions (is the server still serving?) and watch whether the server ends the stalled
    calls; then release them. Returns the versions the valid expert went into (the only versions the
    case may add; with the handler pool exhausted it may be taken after the client gave up on it)."""
    from fedmerge.service.intake import submission_id

    count = srv.max_workers if attack.streams < 0 else attack.streams
    opened = time.monotonic()
    stalls = [Stall(srv.target, attack, label=f"stall-{i}") for i in range(count)]
    spare = intake_valid(srv.store, seed=seed).data
    try:
        time.sleep(0.3)
        bystander = list(TOKENS)[1]  # the stalling client's own extra streams may be refused
        result = send(srv.target, Attack(spare), label="during-stall", token=bystander, timeout=stall_s)
        out.serving = result.ok and serving(srv.target, timeout=1.0)
        while time.monotonic() < opened + stall_s + 0.5 and not all(s.done() for s in stalls):
            time.sleep(0.05)
        ended = [s.answer() for s in stalls if s.done()]
        state = "still serving" if out.serving else "not serving"
        if len(ended) == len(stalls):
            out.error = f"{len(stalls)} stalled stream(s) dropped by the server: {ended[0]}; {state}"
        else:
            out.error = (
                f"{len(stalls) - len(ended)} of {len(stalls)} stalled stream(s) still open after "
                f"{stall_s:g} s (no server-side idle timeout); {state} meanwhile"
            )
    finally:
        for s in stalls:
            s.release()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not serving(srv.target, timeout=1.0):
        time.sleep(0.05)
    sid = submission_id(hashlib.sha256(spare).hexdigest())
    state, version, _ = settle(srv.target, sid, timeout=10.0 if result.ok else 2.0, token=bystander)
    return {version} if state == "merged" else set()


def summarize(outcomes: Sequence[Outcome], lost_acknowledged: int) -> dict[str, int]:
    """The counts ``python -m bench hostile`` prints as its last line."""
    return {
        "cases": len(outcomes),
        "crashes": sum(o.crash for o in outcomes),
        "changed_versions": sum(not o.versions_unchanged for o in outcomes),
        "lost_acknowledged": lost_acknowledged,
        "not_serving": sum(not o.serving for o in outcomes),
        "unexpected": sum(not o.as_expected and not o.gap for o in outcomes),
        "known_gaps": sum(not o.as_expected and bool(o.gap) for o in outcomes),
    }


def temporary_workdir(prefix: str = "fedmerge-hostile-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
