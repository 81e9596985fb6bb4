"""What the store's tools (export, model card, verify, gc) read from a store: the reading half of
:class:`~fedmerge.store.model_store.ModelStore`, as a protocol, so those tools sit under the store
class that mounts them instead of importing it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from fedmerge.store.blobs import BlobBackend
from fedmerge.store.catalog import Catalog, VersionRow
from fedmerge.store.manifest import Version
from fedmerge.store.safetensors_format import TensorSpec


class StoreReader(Protocol):
    """A model store as read by export, card, verify and gc (:class:`ModelStore` is one)."""

    @property
    def root(self) -> Path: ...

    @property
    def manifest_dir(self) -> Path: ...

    @property
    def blobs(self) -> BlobBackend: ...

    @property
    def catalog(self) -> Catalog: ...

    def get(self, ref: str) -> Version: ...

    def read_manifest(self, row: VersionRow) -> Version: ...

    def root_of(self, version: Version) -> Version: ...

    def chain(self, version: Version) -> list[Version]: ...

    def read_files(self, ref: str | Version) -> dict[str, bytes]: ...

    def materialized_specs(self, ref: str | Version) -> list[TensorSpec]: ...

    def iter_total_delta(self, ref: str | Version) -> Iterator[tuple[str, torch.Tensor]]: ...
