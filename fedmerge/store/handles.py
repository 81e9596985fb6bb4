"""Another handle on an open store, for code that opens the store in its own threads (the run's bulk
endpoint streams bases to clients from gRPC handler threads, and SQLite connections stay in their
thread): :func:`reopener`.

The handle names the same store in every part: the same directory, or the same ``s3://`` bucket,
endpoint and read-through cache; the same catalog (the SQLite file inside the store, or the same
``postgresql://`` database). Opening a store by its directory alone would miss the last two: an
``s3://`` store's directory is only its local cache, and its catalog may be in PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fedmerge.store.model_store import ModelStore
from fedmerge.store.pg_catalog import PgCatalog
from fedmerge.store.s3 import S3BlobBackend


def reopener(store: ModelStore) -> Callable[[], ModelStore]:
    """A function that opens a new :class:`ModelStore` on the same store as ``store`` (the caller
    closes each handle it opens)."""
    catalog = store.catalog.url if isinstance(store.catalog, PgCatalog) else None
    blobs = store.blobs
    if isinstance(blobs, S3BlobBackend):
        return partial(
            ModelStore.open, str(blobs.loc), catalog=catalog, s3_endpoint=blobs.endpoint, cache_dir=blobs.root
        )
    return partial(ModelStore.open, store.root, catalog=catalog)
