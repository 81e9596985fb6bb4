"""Why a package was refused: one :class:`~fedmerge.errors.InvalidSubmission` subclass per failure.

Every error carries ``tensor`` (the offending tensor's name, or ``None`` for package-level
problems) and a message that names the tensor, the value that was wrong and what to do about it.
Nothing a refused package carried has been used.
"""

from __future__ import annotations

from fedmerge.errors import InvalidSubmission


class PackageError(InvalidSubmission):
    """Base of every decode-side refusal; ``tensor`` names the offending tensor when there is one."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message if tensor is None else f"tensor {tensor!r}: {message}")
        self.tensor = tensor


class MalformedPackage(PackageError):
    """The bytes are not a parseable DeltaPackage, or a required field is missing or unknown."""


class UnsupportedFormatVersion(PackageError):
    """The package declares a ``format_version`` this decoder does not know."""


class ChecksumMismatch(PackageError):
    """A tensor's or the package's SHA-256 does not match its content: corrupted in transit or tampered."""


class DeclaredSizeTooLarge(PackageError):
    """A declared size (numel, nnz, tensor count, name length...) is above the configured DecodeLimits."""


class PayloadSizeMismatch(PackageError):
    """A payload's length disagrees with what the tensor header declares."""


class InvalidIndices(PackageError):
    """Decoded indices are out of bounds, unsorted, duplicated, or their count differs from ``nnz``."""


class NonFiniteValues(PackageError):
    """A value or block scale is NaN or infinite."""


class UnsupportedDtype(PackageError):
    """The declared original dtype is not a floating dtype fedmerge accepts."""


class TensorNameMismatch(PackageError):
    """A tensor is missing, unexpected or duplicated relative to the base version."""


class TensorShapeMismatch(PackageError):
    """A tensor's declared shape differs from the base version's."""
