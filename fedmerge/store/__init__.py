"""The versioned model store: immutable, content-addressed, crash-safe versions with lineage.

``ModelStore.open(path)`` gives the facade; see ``docs/store.md`` for the layout and guarantees.
"""

from fedmerge.store.blobs import BlobBackend, LocalBlobBackend
from fedmerge.store.errors import (
    CorruptBlobError,
    ForeignFileError,
    InvalidAliasError,
    MissingBlobError,
    StoreBusyError,
    UnknownVersionError,
)
from fedmerge.store.export import ExportResult
from fedmerge.store.gc import GcReport
from fedmerge.store.manifest import Contributor, TensorEntry, Version
from fedmerge.store.model_store import Diff, Lineage, ModelStore, TensorDiff, TensorView
from fedmerge.store.verify import Problem, VerifyReport

__all__ = [
    "BlobBackend",
    "Contributor",
    "CorruptBlobError",
    "Diff",
    "ExportResult",
    "ForeignFileError",
    "GcReport",
    "InvalidAliasError",
    "Lineage",
    "LocalBlobBackend",
    "MissingBlobError",
    "ModelStore",
    "Problem",
    "StoreBusyError",
    "TensorDiff",
    "TensorEntry",
    "TensorView",
    "UnknownVersionError",
    "VerifyReport",
    "Version",
]
