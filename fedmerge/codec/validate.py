"""Validation on decode: every declared size is checked against limits and payload lengths BEFORE
anything is allocated, then checksums, then content (indices, finiteness, names and shapes).

Order (each step refuses with a specific :class:`~fedmerge.codec.errors.PackageError`):

1. package length ≤ ``max_package_bytes``                     → DeclaredSizeTooLarge
2. protobuf parses                                             → MalformedPackage
3. ``format_version`` known                                    → UnsupportedFormatVersion
4. header sizes: tensor count, metadata, names, ndim, numel, Σnumel, nnz ≤ numel, block size,
   known enums and dtype, a factor pair's rank and size (P·Q of the declared shape)
                                            → DeclaredSizeTooLarge / MalformedPackage / UnsupportedDtype
5. exact payload lengths implied by the header                 → PayloadSizeMismatch
6. names and shapes against the base version (if given)        → TensorNameMismatch / TensorShapeMismatch
7. package checksum, then each tensor's checksum               → ChecksumMismatch
8. indices in bounds, strictly increasing, count = nnz        → InvalidIndices
9. values and block scales finite                              → NonFiniteValues
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedmerge.codec import index_coding, quantize
from fedmerge.codec.errors import (
    DeclaredSizeTooLarge,
    MalformedPackage,
    PayloadSizeMismatch,
    TensorNameMismatch,
    TensorShapeMismatch,
    UnsupportedDtype,
)
from fedmerge.codec.sparsify import RANDOMK_ONE
from fedmerge.v1 import delta_pb2

VALUE_ENCODINGS: dict[int, str] = {
    delta_pb2.VALUE_ENCODING_FP32: "fp32",
    delta_pb2.VALUE_ENCODING_FP16: "fp16",
    delta_pb2.VALUE_ENCODING_BF16: "bf16",
    delta_pb2.VALUE_ENCODING_INT8: "int8",
    delta_pb2.VALUE_ENCODING_INT4: "int4",
    delta_pb2.VALUE_ENCODING_SIGN: "sign",
}
INDEX_ENCODINGS: dict[int, str] = {
    delta_pb2.INDEX_ENCODING_DENSE: "dense",
    delta_pb2.INDEX_ENCODING_COO_INT32: "coo",
    delta_pb2.INDEX_ENCODING_BITMAP: "bitmap",
    delta_pb2.INDEX_ENCODING_GAP_VARINT: "varint",
    delta_pb2.INDEX_ENCODING_GAP_RICE: "rice",
    delta_pb2.INDEX_ENCODING_SEEDED: "seeded",
    delta_pb2.INDEX_ENCODING_LOW_RANK: "low_rank",
}
NO_INDEX_BYTES = ("dense", "seeded", "low_rank")
LOW_RANK_FORMAT = 3  # the first package format that may hold a low-rank factor pair
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds a decoder enforces before allocating (defaults suit models up to ~30 B parameters)."""

    max_package_bytes: int = (1 << 31) - 1  # protobuf's own message limit
    max_tensors: int = 100_000
    max_tensor_numel: int = 1 << 31
    max_total_numel: int = 1 << 35
    max_ndim: int = 8
    max_name_bytes: int = 1024
    max_metadata_bytes: int = 1 << 16
    max_block_size: int = 1 << 20

    def within_base(self, shapes: Mapping[str, tuple[int, ...]], *, factor: int = 1) -> DecodeLimits:
        """These limits tightened to what a delta of a base with ``shapes`` can declare: at most
        ``factor × len(shapes) + 1`` tensors (one more dimension at most than the base's), each of
        at most ``factor ×`` the largest base tensor's entries, ``factor ×`` the base's total entries
        in all, and a package of at most ``base_package_bytes(shapes, factor)`` bytes
        (``factor`` = 2 for LoRA factor pairs, whose
        A (r×in) and B (out×r) hold at most ``2·out·in`` entries together with r ≤ min(out, in))."""
        numels = [math.prod(s) for s in shapes.values()] or [0]
        return DecodeLimits(
            max_package_bytes=min(self.max_package_bytes, base_package_bytes(shapes, factor=factor)),
            max_tensors=min(self.max_tensors, factor * len(shapes) + 1),
            max_tensor_numel=min(self.max_tensor_numel, factor * max(numels)),
            max_total_numel=min(self.max_total_numel, factor * sum(numels)),
            max_ndim=min(self.max_ndim, max((len(s) for s in shapes.values()), default=0) + 1),
            max_name_bytes=self.max_name_bytes,
            max_metadata_bytes=self.max_metadata_bytes,
            max_block_size=self.max_block_size,
        )


PACKAGE_OVERHEAD_BYTES = 1 << 16
"""Header slack of one package: metadata, checksums, enum fields (bounded by ``max_metadata_bytes``)."""
TENSOR_OVERHEAD_BYTES = 2048
"""Per-tensor header slack: name (≤ ``max_name_bytes``), shape, checksum, scalars."""


def base_package_bytes(shapes: Mapping[str, tuple[int, ...]], *, factor: int = 1) -> int:
    """The largest honest package for a base with ``shapes``: every entry as fp32 value plus a 4-byte
    index (COO, the widest index coding the encoder picks only when smaller than dense), ×``factor``,
    plus :data:`TENSOR_OVERHEAD_BYTES` per tensor and :data:`PACKAGE_OVERHEAD_BYTES`:
    ``factor·(8·Σnumel + 2048·len(shapes)) + 65536``."""
    total = sum(math.prod(s) for s in shapes.values())
    return factor * (8 * total + TENSOR_OVERHEAD_BYTES * len(shapes)) + PACKAGE_OVERHEAD_BYTES


@dataclass(frozen=True)
class TensorHeader:
    """A tensor's header after validation: decoded enums, numel, shape."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    values: str
    index: str


def check_package_size(length: int, limits: DecodeLimits) -> None:
    if length > limits.max_package_bytes:
        raise DeclaredSizeTooLarge(
            f"package is {length} bytes, above max_package_bytes = {limits.max_package_bytes}; "
            "send a sparser delta or raise DecodeLimits.max_package_bytes"
        )


def check_package_header(pkg: delta_pb2.DeltaPackage, limits: DecodeLimits) -> None:
    """Sizes and enums of the package header (step 4, package part)."""
    if len(pkg.tensors) > limits.max_tensors:
        raise DeclaredSizeTooLarge(
            f"package declares {len(pkg.tensors)} tensors, above max_tensors = {limits.max_tensors}"
        )
    meta_bytes = sum(len(k) + len(v) for k, v in pkg.metadata.items())
    meta_bytes += sum(len(t) for t in pkg.lora_target_modules) + len(pkg.client_id)
    meta_bytes += len(pkg.base_version_id) + len(pkg.base_version_hash)
    if meta_bytes > limits.max_metadata_bytes:
        raise DeclaredSizeTooLarge(
            f"package metadata is {meta_bytes} bytes, above max_metadata_bytes = {limits.max_metadata_bytes}"
        )
    if pkg.kind not in (delta_pb2.DELTA_KIND_TASK_VECTOR, delta_pb2.DELTA_KIND_LORA):
        raise MalformedPackage(f"package kind {pkg.kind} is not task_vector (1) or lora (2)")
    if not math.isfinite(pkg.lora_alpha):
        raise MalformedPackage(f"lora_alpha = {pkg.lora_alpha} is not finite")


def check_tensor_header(
    td: delta_pb2.TensorDelta, limits: DecodeLimits, total_numel: int, format_version: int
) -> TensorHeader:
    """Sizes, enums, dtype and exact payload lengths of one tensor (steps 4 and 5), before any allocation;
    ``format_version`` is the package's (a factor pair needs :data:`LOW_RANK_FORMAT`)."""
    name = td.name
    if len(name.encode()) > limits.max_name_bytes or not name:
        raise DeclaredSizeTooLarge(
            f"tensor name of {len(name.encode())} bytes is empty or above "
            f"max_name_bytes = {limits.max_name_bytes}",
            name[:64],
        )
    if len(td.shape) > limits.max_ndim:
        raise DeclaredSizeTooLarge(f"{len(td.shape)} dimensions, above max_ndim = {limits.max_ndim}", name)
    numel = math.prod(td.shape)  # Python ints: no overflow, and cheap for ndim <= max_ndim
    if numel > limits.max_tensor_numel:
        raise DeclaredSizeTooLarge(
            f"declares shape {tuple(td.shape)} = {numel} entries, "
            f"above max_tensor_numel = {limits.max_tensor_numel}; "
            "refused before allocation",
            name,
        )
    if total_numel + numel > limits.max_total_numel:
        raise DeclaredSizeTooLarge(
            f"package exceeds max_total_numel = {limits.max_total_numel} entries", name
        )
    if td.dtype not in DTYPES:
        raise UnsupportedDtype(f"dtype {td.dtype[:32]!r} is not one of {', '.join(DTYPES)}", name)
    if td.value_encoding not in VALUE_ENCODINGS:
        raise MalformedPackage(f"unknown value_encoding {td.value_encoding}", name)
    if td.index_encoding not in INDEX_ENCODINGS:
        raise MalformedPackage(f"unknown index_encoding {td.index_encoding}", name)
    values, index = VALUE_ENCODINGS[td.value_encoding], INDEX_ENCODINGS[td.index_encoding]
    nnz = td.nnz
    if (nnz > numel and index != "low_rank") or (index == "dense" and nnz != numel):  # pairs: _check_rank
        raise MalformedPackage(f"nnz = {nnz} is impossible for numel = {numel} with {index} indices", name)
    quantised = values in quantize.BLOCK_SCALED
    if quantised and not 1 <= td.block_size <= limits.max_block_size:
        raise MalformedPackage(f"block_size = {td.block_size} outside [1, {limits.max_block_size}]", name)
    if index == "rice" and td.rice_k > index_coding.MAX_RICE_K:
        raise MalformedPackage(f"rice_k = {td.rice_k} above {index_coding.MAX_RICE_K}", name)
    if index == "seeded" and td.keep_threshold > RANDOMK_ONE:
        raise MalformedPackage(f"keep_threshold = {td.keep_threshold} above 2^53", name)
    _check_rank(td, index, numel)
    if index == "low_rank" and format_version < LOW_RANK_FORMAT:
        raise MalformedPackage(
            f"a low-rank factor pair in a format {format_version} package (needs format {LOW_RANK_FORMAT})",
            name,
        )
    _expect_len("value", len(td.values), quantize.value_bytes(values, nnz), name)
    block = td.block_size if quantised else 1
    _expect_len("block-scale", len(td.block_scales), quantize.scale_bytes(values, nnz, block), name)
    if index in NO_INDEX_BYTES:
        _expect_len("index", len(td.indices), 0, name)
    else:
        index_coding.check_length(index, len(td.indices), numel, nnz, td.rice_k, name=name)
    return TensorHeader(name, tuple(int(d) for d in td.shape), numel, td.dtype, values, index)


def _check_rank(td: delta_pb2.TensorDelta, index: str, numel: int) -> None:
    """A factor pair (``low_rank``) is P (m × r) ‖ Q (r × n) of a 2-D tensor: 1 ≤ r ≤ min(m, n) and
    nnz = r·(m + n) ≤ m·n, so the product has the declared shape and the pair is no larger than the
    tensor; every other index encoding carries rank 0."""
    name, rank = td.name, td.rank
    if index != "low_rank":
        if rank:
            raise MalformedPackage(
                f"rank = {rank} on a tensor with {index} indices (factor pairs only)", name
            )
        return
    if len(td.shape) != 2:
        raise MalformedPackage(
            f"a low-rank factor pair needs a 2-D tensor, not shape {tuple(td.shape)}", name
        )
    rows, cols = td.shape
    if not 1 <= rank <= min(rows, cols):
        raise MalformedPackage(f"rank = {rank} outside [1, {min(rows, cols)}] for shape {(rows, cols)}", name)
    want = rank * (rows + cols)
    if td.nnz != want or want > numel:
        raise MalformedPackage(
            f"nnz = {td.nnz}, but factors P ({rows} x {rank}) and Q ({rank} x {cols}) of a "
            f"{rows} x {cols} tensor hold {want} values{' (more than the tensor)' if want > numel else ''}",
            name,
        )


def check_expected(
    headers: list[TensorHeader],
    expected: Mapping[str, tuple[int, ...]] | None,
    *,
    allow_missing: bool = False,
) -> None:
    """Names unique; with ``expected`` (the base version's shapes), only those names with those shapes
    and — unless ``allow_missing`` (a partial delta) — every one of them, and at least one (step 6)."""
    seen: set[str] = set()
    for h in headers:
        if h.name in seen:
            raise TensorNameMismatch("appears twice in the package", h.name)
        seen.add(h.name)
    if expected is None:
        return
    for h in headers:
        if h.name not in expected:
            raise TensorNameMismatch(
                "is not a tensor of the base version; was the delta computed against another model?", h.name
            )
        if tuple(expected[h.name]) != h.shape:
            raise TensorShapeMismatch(
                f"declares shape {h.shape} but the base version has {tuple(expected[h.name])}", h.name
            )
    if not headers:
        raise TensorNameMismatch(
            "package holds no tensors; a delta must change at least one tensor of the base version"
        )
    missing = sorted(set(expected) - seen)
    if missing and not allow_missing:
        raise TensorNameMismatch(
            f"is missing from the package ({len(missing)} base tensors missing); "
            "send every tensor, zeros included",
            missing[0],
        )


def _expect_len(what: str, got: int, want: int, name: str) -> None:
    if got != want:
        raise PayloadSizeMismatch(f"{what} payload is {got} bytes but the header implies {want}", name)
