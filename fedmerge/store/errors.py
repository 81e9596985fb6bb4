"""Errors of the model store, all under :mod:`fedmerge.errors`.

StoreIntegrityError (fedmerge.errors)   the store is inconsistent or corrupted
├── CorruptBlobError                    a blob's bytes no longer hash to its name
├── MissingBlobError                    a manifest references a blob that is not there
└── ForeignFileError                    a file the store did not write sits in its directory
UnknownVersionError                     no version or alias of that name (a lookup error, not corruption)
StoreBusyError                          another process held the catalog too long; retry the call
"""

from __future__ import annotations

from fedmerge.errors import ConfigError, FedMergeError, StoreIntegrityError


class CorruptBlobError(StoreIntegrityError):
    """A blob's content no longer matches its sha256 name (or its header disagrees with the manifest)."""


class MissingBlobError(StoreIntegrityError):
    """A committed manifest references a blob that is absent from the blob backend."""


class ForeignFileError(StoreIntegrityError):
    """A file that the store did not write was found inside the store directory."""


class UnknownVersionError(FedMergeError, KeyError):
    """No committed version has this id, and no alias has this name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidAliasError(ConfigError):
    """An alias name is malformed or would shadow a version id."""


class StoreBusyError(FedMergeError, RuntimeError):
    """The catalog stayed locked by another process longer than the busy timeout.

    Nothing was committed; the call is safe to retry (``retryable`` is always ``True``).
    """

    retryable = True
