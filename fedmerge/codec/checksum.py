"""Checksums: SHA-256 over a canonical byte layout, so they never depend on protobuf serialisation.

Tensor checksum = SHA-256 of::

    b"fedmerge.TensorDelta\\0" ‖ str(name) ‖ u64(ndim) ‖ u64(d)… ‖ str(dtype)
    ‖ u32(value_encoding) ‖ u32(index_encoding) ‖ u64(nnz) ‖ u32(block_size) ‖ u32(rice_k)
    ‖ u64(seed) ‖ u64(keep_threshold) [‖ u32(rank)] ‖ blob(block_scales) ‖ blob(indices) ‖ blob(values)

where ``u32(rank)`` is hashed only for a low-rank factor pair (rank ≥ 1, package format 3), so the
checksums of formats 1 and 2 are unchanged.

Package checksum = SHA-256 of::

    b"fedmerge.DeltaPackage\\0" ‖ u32(format_version) ‖ str(client_id) ‖ u64(round)
    ‖ str(base_version_id) ‖ str(base_version_hash) ‖ u32(kind) ‖ u64(num_examples)
    ‖ u32(lora_rank) ‖ f64(lora_alpha) ‖ u64(#targets) ‖ str(t)…
    ‖ u64(#metadata) ‖ (str(k) ‖ str(v))… sorted by k
    ‖ u64(#tensors) ‖ tensor checksum…

with little-endian integers, str(s) = u64(len(utf8)) ‖ utf8 and blob(b) = u64(len(b)) ‖ b. Checksums
detect corruption, not forgery: authenticate the sender at the transport.

**Folded tensor checksums** (package format 2): a tensor whose three payloads total at most
``FOLDED_MAX_PAYLOAD_BYTES`` leaves its ``checksum`` field empty. The package checksum is defined as
above, over every tensor checksum: for a folded tensor the decoder computes it from the tensor's bytes,
so a changed byte still fails the package checksum (SHA-256 throughout; only the error no longer names
the tensor). It saves 34 bytes per small tensor — most of a small model's package (``bench/RESULTS.md``).
Format 1 packages carry every tensor checksum.
"""

from __future__ import annotations

import hashlib
import struct

from fedmerge.codec.errors import MalformedPackage
from fedmerge.v1 import delta_pb2

DIGEST_BYTES = 32
FOLDED_MAX_PAYLOAD_BYTES = 4096
FOLDING_FORMAT = 2  # the first package format whose tensors may leave their checksum to the package's


def payload_bytes(td: delta_pb2.TensorDelta) -> int:
    """Bytes of the tensor's three payloads (block scales, indices, values)."""
    return len(td.block_scales) + len(td.indices) + len(td.values)


def folds(td: delta_pb2.TensorDelta) -> bool:
    """Whether an encoder leaves ``td``'s checksum to the package checksum (small payloads)."""
    return payload_bytes(td) <= FOLDED_MAX_PAYLOAD_BYTES


def carried_or_computed(td: delta_pb2.TensorDelta, format_version: int) -> bytes:
    """The tensor checksum the package checksum hashes: the one ``td`` carries, or for a folded tensor
    (format ≥ 2, small payloads, empty field) the one computed from its bytes; :class:`MalformedPackage`
    for a missing checksum the format does not allow."""
    if td.checksum:
        return bytes(td.checksum)
    if format_version >= FOLDING_FORMAT and folds(td):
        return tensor_checksum(td)
    raise MalformedPackage(
        f"tensor checksum is missing (format {format_version}); only tensors with at most "
        f"{FOLDED_MAX_PAYLOAD_BYTES} payload bytes in format >= {FOLDING_FORMAT} "
        "leave it to the package checksum",
        td.name,
    )


def _str(h: hashlib._Hash, s: str) -> None:
    raw = s.encode("utf-8", errors="surrogatepass")
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def _blob(h: hashlib._Hash, b: bytes) -> None:
    h.update(struct.pack("<Q", len(b)))
    h.update(b)


def tensor_checksum(td: delta_pb2.TensorDelta, payloads: tuple[bytes, bytes, bytes] | None = None) -> bytes:
    """SHA-256 of ``td``'s canonical layout; ``payloads`` = (block_scales, indices, values) if read."""
    h = hashlib.sha256(b"fedmerge.TensorDelta\0")
    _str(h, td.name)
    h.update(struct.pack("<Q", len(td.shape)))
    h.update(struct.pack(f"<{len(td.shape)}Q", *td.shape))
    _str(h, td.dtype)
    h.update(
        struct.pack(
            "<IIQIIQQ",
            td.value_encoding,
            td.index_encoding,
            td.nnz,
            td.block_size,
            td.rice_k,
            td.seed,
            td.keep_threshold,
        )
    )
    if td.rank:
        h.update(struct.pack("<I", td.rank))
    scales, indices, values = payloads if payloads is not None else (td.block_scales, td.indices, td.values)
    _blob(h, scales)
    _blob(h, indices)
    _blob(h, values)
    return h.digest()


def package_checksum(pkg: delta_pb2.DeltaPackage) -> bytes:
    """SHA-256 of the package header and its tensors' checksums (which must already be set)."""
    h = hashlib.sha256(b"fedmerge.DeltaPackage\0")
    h.update(struct.pack("<I", pkg.format_version))
    _str(h, pkg.client_id)
    h.update(struct.pack("<Q", pkg.round))
    _str(h, pkg.base_version_id)
    _str(h, pkg.base_version_hash)
    h.update(struct.pack("<IQId", pkg.kind, pkg.num_examples, pkg.lora_rank, pkg.lora_alpha))
    h.update(struct.pack("<Q", len(pkg.lora_target_modules)))
    for target in pkg.lora_target_modules:
        _str(h, target)
    h.update(struct.pack("<Q", len(pkg.metadata)))
    for key in sorted(pkg.metadata):
        _str(h, key)
        _str(h, pkg.metadata[key])
    h.update(struct.pack("<Q", len(pkg.tensors)))
    for td in pkg.tensors:
        _blob(h, td.checksum)
    return h.digest()
