"""A whole delta ⇄ one serialized ``fedmerge.v1.DeltaPackage``.

``encode_package`` runs, per tensor (in sorted name order): error-feedback correction → sparsify
→ quantise → index coding (smallest wins) → SHA-256, then the package checksum; tensors with small
payloads then leave their checksum to the package's (format 2, :mod:`fedmerge.codec.checksum`).
``decode_package`` validates everything (see :mod:`fedmerge.codec.validate`) before it returns.

Decoded values are always **fp32**: dense tensors as ``torch.Tensor`` of the declared shape,
sparsified ones (top-k and random-k alike) as :class:`fedmerge.delta.SparseTensor` with sorted
int64 flat indices, so aggregators fold only the non-zeros. The original dtype of every tensor is
reported in ``DecodedPackage.dtypes``; fp64 input travels as fp32 at best.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError

from fedmerge.codec import checksum, container, index_coding, low_rank, quantize, sparsify, validate
from fedmerge.codec.config import CodecConfig
from fedmerge.codec.error_feedback import check_residual, corrected, residual_after
from fedmerge.codec.errors import (
    ChecksumMismatch,
    InvalidIndices,
    MalformedPackage,
    NonFiniteValues,
    UnsupportedFormatVersion,
)
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import CodecError, ConfigError
from fedmerge.seeds import random_k_seed
from fedmerge.v1 import delta_pb2

Kind = Literal["task_vector", "lora"]
_T = TypeVar("_T")
PACKAGE_FORMAT_VERSION = 2
"""The package format this encoder writes (``DeltaPackage.format_version``): 2 may fold small tensors'
checksums into the package checksum; 1 carried every tensor checksum; a package holding a low-rank factor
pair is written as :data:`LOW_RANK_FORMAT` (older decoders refuse it by its version). Not the store's
format (``fedmerge.FORMAT_VERSION``)."""
LOW_RANK_FORMAT = validate.LOW_RANK_FORMAT
READABLE_PACKAGE_FORMATS = (1, 2, 3)
_KINDS: dict[str, int] = {"task_vector": delta_pb2.DELTA_KIND_TASK_VECTOR, "lora": delta_pb2.DELTA_KIND_LORA}
_VALUE_ENUM = {v: k for k, v in validate.VALUE_ENCODINGS.items()}
_INDEX_ENUM = {v: k for k, v in validate.INDEX_ENCODINGS.items()}


@dataclass(frozen=True)
class PackageMeta:
    """Who sent the delta, against which base version, and what it is."""

    client_id: str
    round: int
    base_version_id: str
    base_version_hash: str
    kind: Kind = "task_vector"
    num_examples: int = 0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_target_modules: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"PackageMeta.kind must be 'task_vector' or 'lora', got {self.kind!r}")
        for name in ("round", "num_examples", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"PackageMeta.{name} must be an int >= 0, got {value!r}")
        if not math.isfinite(self.lora_alpha):
            raise ConfigError(f"PackageMeta.lora_alpha must be finite, got {self.lora_alpha!r}")


@dataclass(frozen=True)
class TensorBytes:
    """Bytes spent on one tensor (``total_bytes``: its serialized TensorDelta, with header and checksum)."""

    name: str
    numel: int
    nnz: int
    values: str
    index: str
    index_bytes: int
    value_bytes: int
    scale_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ByteReport:
    """Per-tensor and total bytes of a package, next to the dense fp32 and fp16 sizes of the same delta."""

    tensors: dict[str, TensorBytes]
    total_bytes: int
    dense_fp32_bytes: int
    dense_fp16_bytes: int

    @property
    def frac_of_fp32(self) -> float:
        return self.total_bytes / self.dense_fp32_bytes if self.dense_fp32_bytes else 0.0

    @property
    def frac_of_fp16(self) -> float:
        return self.total_bytes / self.dense_fp16_bytes if self.dense_fp16_bytes else 0.0


@dataclass(frozen=True)
class EncodeResult:
    """The serialized package, the new error-feedback residual ({} when disabled) and the byte report."""

    data: bytes
    residual: dict[str, torch.Tensor]
    report: ByteReport


@dataclass(frozen=True)
class DecodedPackage:
    """A verified package: metadata, fp32 tensors (dense or SparseTensor), original dtypes, checksum."""

    meta: PackageMeta
    tensors: dict[str, torch.Tensor | SparseTensor]
    dtypes: dict[str, str]
    checksum: bytes


# ------------------------------------------------------------------------------------------- encoding


@dataclass
class _Selected:
    name: str
    shape: tuple[int, ...]
    dtype: str
    flat: torch.Tensor  # corrected fp32 values, flat (dense input) or the carried values (sparse input)
    indices: torch.Tensor | None = None  # None = dense
    scale: float = 1.0
    seed: int = 0
    threshold: int = 0
    sparse_input: bool = False
    owned: bool = False  # flat is a buffer of our own (δ + e), reusable for the new residual
    carried: torch.Tensor | None = None  # flat[indices], when the selection gathered it already
    rank: int = 0  # > 0: sent as a rank-``rank`` factor pair (low_rank), not sparsified


def encode_package(
    delta: Mapping[str, torch.Tensor | SparseTensor],
    config: CodecConfig,
    *,
    meta: PackageMeta,
    residual: dict[str, torch.Tensor] | None = None,
) -> EncodeResult:
    """Encode ``delta`` (name → tensor or SparseTensor) with ``config``; see the module docstring.

    A :class:`SparseTensor` is sent with its own support (no further sparsification) unless a residual
    for it is given, in which case it is densified, corrected and sparsified like a dense tensor.
    Raises :class:`CodecError` naming the tensor for non-finite values, non-floating dtypes, fp16
    overflow or a residual that does not match the delta.
    """
    shapes = {name: tuple(t.shape) for name, t in delta.items()}
    if residual:
        check_residual(residual, shapes)
    items = [_prepare(name, delta[name], (residual or {}).get(name)) for name in sorted(delta)]
    deferred = _select(items, config, meta)
    pkg = delta_pb2.DeltaPackage(
        format_version=PACKAGE_FORMAT_VERSION,
        client_id=meta.client_id,
        round=meta.round,
        base_version_id=meta.base_version_id,
        base_version_hash=meta.base_version_hash,
        kind=_KINDS[meta.kind],  # type: ignore[arg-type]
        num_examples=meta.num_examples,
        lora_rank=meta.lora_rank,
        lora_alpha=meta.lora_alpha,
        lora_target_modules=list(meta.lora_target_modules),
        metadata=dict(meta.metadata),
    )
    new_residual: dict[str, torch.Tensor] = {}
    partial: dict[str, tuple[int, int, int, str, str]] = {}
    encoded: list[tuple[delta_pb2.TensorDelta, torch.Tensor, tuple[int, int, int, str, str]]] = [
        (delta_pb2.TensorDelta(), torch.zeros(0), (0, 0, 0, "", ""))
    ] * len(items)

    failures: list[tuple[int, int, CodecError]] = []  # (stage, item, error); stage 0 = selection

    def encode_one(i: int) -> None:
        item = items[i]
        if id(item) in deferred:
            try:
                _select_topk([item], config)
            except CodecError as exc:
                failures.append((0, i, exc))
                return
        try:
            encoded[i] = _encode_tensor(item, config)
        except CodecError as exc:
            failures.append((1, i, exc))

    _each(encode_one, list(range(len(items))), sum(int(it.flat.numel()) for it in items))
    if failures:  # as if every selection ran before any encoding, in name order
        raise min(failures, key=lambda f: (f[0], f[1]))[2]
    if any(it.rank for it in items):
        pkg.format_version = LOW_RANK_FORMAT
    for item, (td, rec, sizes) in zip(items, encoded, strict=True):
        pkg.tensors.append(td)
        partial[item.name] = sizes
        if config.error_feedback:
            base = _dense(item) if item.sparse_input else item.flat
            new_residual[item.name] = residual_after(base, item.indices, rec, item.shape, owned=item.owned)
    pkg.checksum = checksum.package_checksum(pkg)
    for td in pkg.tensors:  # small tensors leave their checksum to the package's (format 2)
        if checksum.folds(td):
            td.ClearField("checksum")
    data = pkg.SerializeToString()
    if config.deflate:
        data = container.deflated(data)
    return EncodeResult(data, new_residual, _report(pkg, partial, len(data)))


PARALLEL_MIN_NUMEL = 1 << 18
"""Below this many entries in a package the stages run on the calling thread (no pool start-up)."""


def _each(fn: Callable[[_T], None], jobs: list[_T], numel: int) -> None:
    """``fn(job)`` for every job, on up to ``os.cpu_count()`` threads for large packages. The heavy
    stages (selection, quantisation, index coding, SHA-256) release the GIL; every job writes only
    its own slot, so the package is byte-identical to a serial encode."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers < 2 or numel < PARALLEL_MIN_NUMEL:
        for job in jobs:
            fn(job)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, jobs))


def _dense(item: _Selected) -> torch.Tensor:
    out = torch.zeros(math.prod(item.shape), dtype=torch.float32)  # sparse input: residual support only
    assert item.indices is not None
    out[item.indices] = item.flat
    return out


def _prepare(name: str, tensor: torch.Tensor | SparseTensor, residual: torch.Tensor | None) -> _Selected:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in validate.DTYPES:
        raise CodecError(
            f"tensor {name!r} has dtype {dtype}; deltas carry floating tensors only "
            f"({', '.join(validate.DTYPES)}): leave integer buffers out"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if isinstance(tensor, SparseTensor):
        if residual is not None:
            return _Selected(
                name, shape, dtype, corrected(tensor.to_dense(torch.float32), residual), owned=True
            )
        idx = tensor.indices.to(torch.int64).contiguous()
        numel = math.prod(shape)
        if idx.numel() and (
            int(idx.min()) < 0 or int(idx.max()) >= numel or not bool((idx[1:] > idx[:-1]).all())
        ):
            raise CodecError(f"SparseTensor {name!r} needs sorted unique indices in [0, {numel})")
        values = tensor.values.detach().to(torch.float32).contiguous()
        _check_finite(name, values)
        return _Selected(name, shape, dtype, values, indices=idx, sparse_input=True)
    return _Selected(name, shape, dtype, corrected(tensor, residual), owned=residual is not None)


def _check_finite(name: str, values: torch.Tensor) -> None:
    finite = np.isfinite(values.numpy())  # numpy: much faster than torch.isfinite on CPU
    if not finite.all():
        bad = int(np.argmin(finite))
        raise CodecError(
            f"tensor {name!r} holds a non-finite value at flat index {bad}; a delta must be finite"
        )


def _select(items: list[_Selected], config: CodecConfig, meta: PackageMeta) -> set[int]:
    """Fill ``indices`` (and the random-k seed) of every item according to the sparsification stage,
    except for per-tensor top-k: the ids of those items are returned, for :func:`_select_topk` to
    select each in the same job that then encodes it."""
    todo = [it for it in items if not it.sparse_input]
    for it in todo:
        if low_rank.qualifies(it.shape, config.rank):
            it.rank = config.rank
    minimum = max(1, config.min_sparse_numel)
    sparse = [it for it in todo if config.sparsify != "none" and it.flat.numel() >= minimum and not it.rank]
    chosen = {id(it) for it in sparse}
    for it in todo:
        if id(it) not in chosen:
            _check_finite(it.name, it.flat)  # top-k and random-k check their own inputs
    if config.sparsify == "topk" and sparse:
        if config.scope == "tensor":
            return chosen
        _select_topk(sparse, config)
    elif config.sparsify == "randomk":
        threshold = sparsify.keep_threshold(config.density)
        for it in sparse:
            _check_finite(it.name, it.flat)
            it.seed = random_k_seed(config.seed, meta.client_id, meta.round, it.name)
            it.threshold = threshold
            it.indices, _ = sparsify.randomk_indices(it.seed, threshold, int(it.flat.numel()))
            it.scale = sparsify.RANDOMK_ONE / threshold if config.rescale else 1.0
    return set()


def _select_topk(group: list[_Selected], config: CodecConfig) -> None:
    """Top-k over ``group`` together (one tensor: per-tensor scope; all: global scope)."""
    k = sparsify.topk_count(sum(int(it.flat.numel()) for it in group), config.density)
    picked = sparsify.topk_select([it.flat for it in group], k, [it.name for it in group])
    for it, (idx, vals) in zip(group, picked, strict=True):
        it.indices, it.carried = idx, vals


def _encode_tensor(
    item: _Selected, config: CodecConfig
) -> tuple[delta_pb2.TensorDelta, torch.Tensor, tuple[int, int, int, str, str]]:
    """One tensor's carried values (the selected entries, or a factor pair P ‖ Q when ``item.rank``:
    :mod:`fedmerge.codec.low_rank`) quantised, its positions coded; the reconstruction for error
    feedback (P̂·Q̂ for a pair)."""
    numel = math.prod(item.shape)
    if item.rank:
        carried = low_rank.factorize(item.flat.reshape(item.shape), item.rank)
    elif item.sparse_input or item.indices is None:
        carried = item.flat
    elif item.carried is not None:
        carried = item.carried
    else:
        carried = item.flat.index_select(0, item.indices)
    if item.scale != 1.0:
        carried = carried * item.scale
    q = quantize.encode(
        carried, config.values, config.block_size, name=item.name, reconstruct=config.error_feedback
    )
    if item.rank:
        index_name, rice_k, index_bytes = "low_rank", 0, b""
    elif item.indices is None:
        index_name, rice_k, index_bytes = "dense", 0, b""
    elif item.threshold:
        index_name, rice_k, index_bytes = "seeded", 0, b""
    else:
        idx_np = item.indices.numpy()
        index_name, rice_k = index_coding.choose(idx_np, numel, config.index_coding)
        index_bytes = index_coding.encode(index_name, idx_np, numel, rice_k)
    td = delta_pb2.TensorDelta(
        name=item.name,
        shape=list(item.shape),
        dtype=item.dtype,
        value_encoding=_VALUE_ENUM[config.values],  # type: ignore[arg-type]
        index_encoding=_INDEX_ENUM[index_name],  # type: ignore[arg-type]
        nnz=int(carried.numel()),
        block_size=config.block_size if config.quantised else 0,
        block_scales=q.scales,
        indices=index_bytes,
        values=q.data,
        rice_k=rice_k,
        seed=item.seed,
        keep_threshold=item.threshold,
        rank=item.rank,
    )
    td.checksum = checksum.tensor_checksum(td, (q.scales, index_bytes, q.data))
    rec = q.reconstructed if q.reconstructed is not None else torch.zeros(0)
    if item.rank and q.reconstructed is not None:
        rec = low_rank.product(q.reconstructed, item.shape, item.rank).reshape(-1)
    return td, rec, (len(index_bytes), len(q.data), len(q.scales), config.values, index_name)


def _report(
    pkg: delta_pb2.DeltaPackage, partial: dict[str, tuple[int, int, int, str, str]], total: int
) -> ByteReport:
    tensors = {}
    numel_total = 0
    for td in pkg.tensors:
        numel = math.prod(td.shape)
        numel_total += numel
        ib, vb, sb, values, index = partial[td.name]
        tensors[td.name] = TensorBytes(td.name, numel, td.nnz, values, index, ib, vb, sb, td.ByteSize())
    return ByteReport(tensors, total, 4 * numel_total, 2 * numel_total)


# ------------------------------------------------------------------------------------------- decoding


def check_format_version(version: int) -> None:
    """:class:`UnsupportedFormatVersion` unless this decoder reads package format ``version``."""
    if version not in READABLE_PACKAGE_FORMATS:
        raise UnsupportedFormatVersion(
            f"format_version {version} is not supported by this decoder "
            f"(reads {', '.join(map(str, READABLE_PACKAGE_FORMATS))}); "
            "upgrade fedmerge or re-encode with a matching client"
        )


def read_headers(
    data: bytes,
    limits: validate.DecodeLimits = validate.DecodeLimits(),  # noqa: B008 (frozen)
) -> tuple[delta_pb2.DeltaPackage, PackageMeta, list[validate.TensorHeader]]:
    """Steps 1–5 of validation only: the parsed package, its metadata and every tensor header with
    its declared shape, checked against ``limits`` and the payload lengths — no payload is decoded and
    nothing proportional to a declared size is allocated (callers compare the headers with the base).
    A deflated package (:mod:`fedmerge.codec.container`) is inflated first, within ``limits``."""
    inside = container.opened(data, limits)
    if inside is not None:
        data = inside
    pkg = delta_pb2.DeltaPackage()
    try:
        pkg.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise MalformedPackage(
            f"bytes are not a fedmerge.v1.DeltaPackage ({exc}); was it truncated?"
        ) from None
    check_format_version(pkg.format_version)
    validate.check_package_header(pkg, limits)
    headers = []
    total_numel = 0
    for td in pkg.tensors:
        header = validate.check_tensor_header(td, limits, total_numel, pkg.format_version)
        total_numel += header.numel
        headers.append(header)
    return pkg, _meta_of(pkg), headers


def decode_package(
    data: bytes,
    *,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    limits: validate.DecodeLimits = validate.DecodeLimits(),  # noqa: B008 (frozen, immutable default)
    allow_missing: bool = False,
) -> DecodedPackage:
    """Verify and decode a serialized DeltaPackage; raise a :class:`PackageError` subclass on any problem.

    ``expected_shapes`` (the base version's name → shape) makes an extra or misshapen tensor, an empty
    package and — unless ``allow_missing`` — a missing tensor an error before any payload is read, and
    tightens ``limits`` to twice the base (:meth:`DecodeLimits.within_base` with ``factor=2``: slack
    so that a misnamed or misshapen tensor is reported as such, while nothing far above the base is
    read). Without it only ``limits``
    bound the allocation; servers always pass the base's shapes.
    """
    if expected_shapes is not None:
        limits = limits.within_base(expected_shapes, factor=2)
    pkg, _, headers = read_headers(data, limits)
    validate.check_expected(headers, expected_shapes, allow_missing=allow_missing)
    for td in pkg.tensors:  # a folded tensor's checksum, computed from its bytes
        td.checksum = checksum.carried_or_computed(td, pkg.format_version)
    digest = checksum.package_checksum(pkg)
    if digest != pkg.checksum:
        raise ChecksumMismatch(
            "package checksum does not match its header and tensor checksums; resend the package"
        )
    tensors: dict[str, torch.Tensor | SparseTensor] = {}
    dtypes: dict[str, str] = {}
    for td, header in zip(pkg.tensors, headers, strict=True):
        tensors[header.name] = _decode_tensor(td, header)
        dtypes[header.name] = header.dtype
    return DecodedPackage(_meta_of(pkg), tensors, dtypes, digest)


def _decode_tensor(td: delta_pb2.TensorDelta, h: validate.TensorHeader) -> torch.Tensor | SparseTensor:
    payloads = (td.block_scales, td.indices, td.values)
    if checksum.tensor_checksum(td, payloads) != td.checksum:
        raise ChecksumMismatch(
            "SHA-256 of the tensor does not match its checksum; the payload is corrupted", h.name
        )
    scales, index_bytes, value_bytes = payloads
    if scales:
        block_scales = np.frombuffer(scales, dtype="<f4")
        if not bool(np.isfinite(block_scales).all()):
            raise NonFiniteValues("a block scale is NaN or infinite", h.name)
        if bool((block_scales < 0).any()):  # the encoder's scales are max|x|/qmax or mean|x|
            raise MalformedPackage(
                f"block scale {int(np.argmax(block_scales < 0))} is negative; "
                f"{h.values} scales are magnitudes (>= 0)",
                h.name,
            )
    values = quantize.decode(h.values, value_bytes, scales, td.nnz, td.block_size)
    if (bad := _first_nonfinite(values)) is not None:
        raise NonFiniteValues(f"value {bad} of {values.numel()} is {float(values[bad])}", h.name)
    if h.index == "dense":
        return values.reshape(h.shape)
    if h.index == "low_rank":
        product = low_rank.product(values, h.shape, td.rank)
        if (bad := _first_nonfinite(product)) is not None:
            raise NonFiniteValues(f"the factors' product P·Q overflows at flat index {bad}", h.name)
        return product
    if h.index == "seeded":
        idx, count = sparsify.randomk_indices(td.seed, td.keep_threshold, h.numel, expected=td.nnz)
        if count != td.nnz:
            raise InvalidIndices(f"seed {td.seed} regenerates {count} positions but nnz = {td.nnz}", h.name)
    else:
        idx = index_coding.decode(h.index, index_bytes, h.numel, td.nnz, td.rice_k, name=h.name)
    return SparseTensor(indices=idx, values=values, shape=h.shape)


def _first_nonfinite(values: torch.Tensor) -> int | None:
    """The flat index of the first NaN or infinity in ``values``, or None (numpy: faster than torch)."""
    finite = np.isfinite(values.numpy())
    return None if finite.all() else int(np.argmin(finite))


def _meta_of(pkg: delta_pb2.DeltaPackage) -> PackageMeta:
    kind: Kind = "lora" if pkg.kind == delta_pb2.DELTA_KIND_LORA else "task_vector"
    return PackageMeta(
        client_id=pkg.client_id,
        round=pkg.round,
        base_version_id=pkg.base_version_id,
        base_version_hash=pkg.base_version_hash,
        kind=kind,
        num_examples=pkg.num_examples,
        lora_rank=pkg.lora_rank,
        lora_alpha=pkg.lora_alpha,
        lora_target_modules=tuple(pkg.lora_target_modules),
        metadata=dict(pkg.metadata),
    )
