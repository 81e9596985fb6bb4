"""Composable delta codec: sparsify → quantise → index coding → checksum, with explicit error feedback.

Public entry points: :func:`encode_package` / :func:`decode_package` for a whole state dict, and
:class:`CodecConfig`, :class:`PackageMeta`, :class:`DecodeLimits`. Each stage lives in its own
module (``sparsify``, ``quantize``, ``index_coding``, ``checksum``, ``error_feedback``) with its
``PROPERTIES`` (lossless or its error bound). The format is described in ``docs/codec.md``.
"""

from fedmerge.codec.config import CodecConfig
from fedmerge.codec.errors import (
    ChecksumMismatch,
    DeclaredSizeTooLarge,
    InvalidIndices,
    MalformedPackage,
    NonFiniteValues,
    PackageError,
    PayloadSizeMismatch,
    TensorNameMismatch,
    TensorShapeMismatch,
    UnsupportedDtype,
    UnsupportedFormatVersion,
)
from fedmerge.codec.package import (
    ByteReport,
    DecodedPackage,
    EncodeResult,
    PackageMeta,
    TensorBytes,
    decode_package,
    encode_package,
    read_headers,
)
from fedmerge.codec.validate import DecodeLimits

__all__ = [
    "ByteReport",
    "ChecksumMismatch",
    "CodecConfig",
    "DeclaredSizeTooLarge",
    "DecodeLimits",
    "DecodedPackage",
    "EncodeResult",
    "InvalidIndices",
    "MalformedPackage",
    "NonFiniteValues",
    "PackageError",
    "PackageMeta",
    "PayloadSizeMismatch",
    "TensorBytes",
    "TensorNameMismatch",
    "TensorShapeMismatch",
    "UnsupportedDtype",
    "UnsupportedFormatVersion",
    "decode_package",
    "encode_package",
    "read_headers",
]
