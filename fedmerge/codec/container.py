"""A serialized DeltaPackage, optionally DEFLATE-compressed as a whole (``CodecConfig.deflate``).

What a package carries beside its values — tensor names, dtype strings, enum tags, the base's id and
hex hash, block scales — and the values themselves (an int4 nibble of a quantised Gaussian carries
about 3 bits, not 4) are redundant; one DEFLATE stream (RFC 1951, zlib level 9, Huffman coding over
LZ77) over the serialized package removes part of it: 9–13 % of a top-20 % int4 or rank-8 package of
the digits task, more of a LoRA package's long module names.

Byte layout of a deflated package::

    0x00 0x01 <raw DEFLATE stream of the serialized DeltaPackage>

A serialized DeltaPackage never starts with ``0x00`` (a protobuf tag of field 0 is invalid), so both
forms are told apart by their first byte and a decoder reads either. The package's own checksums are
those of the inflated bytes; the container adds none.

Judged before trusted: the deflated bytes are size-checked first, then inflated at most
:data:`MAX_INFLATED_BYTES` (or the decoder's ``max_package_bytes``, the smaller) — never more, whatever
the stream declares — and a stream that is truncated, carries trailing bytes or inflates past the bound
is refused (:class:`MalformedPackage`, :class:`DeclaredSizeTooLarge`). The encoder deflates only
packages up to that bound, and only when that makes them smaller; larger ones are sent as they are
(the bulk channel streams them tensor by tensor, and their framing is a negligible share).
"""

from __future__ import annotations

import zlib

from fedmerge.codec import validate
from fedmerge.codec.errors import DeclaredSizeTooLarge, MalformedPackage

MAGIC = b"\x00\x01"
MAX_INFLATED_BYTES = 16 << 20
LEVEL = 9


def deflated(data: bytes) -> bytes:
    """``data`` (a serialized package) as a deflated package when that is smaller and ``data`` is at
    most :data:`MAX_INFLATED_BYTES`; else ``data`` unchanged."""
    if not data or len(data) > MAX_INFLATED_BYTES:
        return data
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)  # raw DEFLATE: the package has its own checksums
    packed = MAGIC + packer.compress(data) + packer.flush()
    return packed if len(packed) < len(data) else data


def is_deflated(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is a deflated package (starts with :data:`MAGIC`)."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def inflated(data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    """The serialized package inside a deflated package, at most ``min(max_bytes, MAX_INFLATED_BYTES)``
    bytes; ``data`` itself (as bytes) when it is not deflated. Raises :class:`DeclaredSizeTooLarge` when
    the stream inflates past the bound (nothing past it is produced) and :class:`MalformedPackage` for a
    corrupt or truncated stream or bytes after its end."""
    if not is_deflated(data):
        return bytes(data)
    bound = min(max_bytes, MAX_INFLATED_BYTES)
    unpacker = zlib.decompressobj(-15)
    try:
        out = unpacker.decompress(memoryview(data)[len(MAGIC) :], bound + 1)
    except zlib.error as exc:
        raise MalformedPackage(f"deflated package does not inflate ({exc}); resend the package") from None
    if len(out) > bound:
        raise DeclaredSizeTooLarge(
            f"deflated package inflates past {bound} bytes (the decoder's bound for a deflated package); "
            "send it uncompressed or sparser"
        )
    if not unpacker.eof:
        raise MalformedPackage("deflated package is truncated (its DEFLATE stream does not end); resend it")
    if unpacker.unused_data:
        raise MalformedPackage(
            f"deflated package has {len(unpacker.unused_data)} bytes after its DEFLATE stream; resend it"
        )
    return out


def opened(data: bytes | bytearray | memoryview, limits: validate.DecodeLimits) -> bytes | None:
    """A decoder's first step: ``data``'s size checked against ``limits``; None when it is not deflated,
    else the package inside (:func:`inflated` within ``limits.max_package_bytes``), its size checked too."""
    validate.check_package_size(len(data), limits)
    if not is_deflated(data):
        return None
    inside = inflated(data, limits.max_package_bytes)
    validate.check_package_size(len(inside), limits)
    return inside
