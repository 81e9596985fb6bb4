"""Reading a store: versions by id or alias (each manifest checked against the catalog), their
tensors, files and aggregator state, the materialised weights θ = θ_root + Σ_k τ_k streamed one tensor
at a time or as lazy :class:`TensorView` mappings, listing and queries, lineage and diff.

:class:`StoreReading` is the reading half of :class:`~fedmerge.store.model_store.ModelStore`, which
adds opening and committing; it needs only the attributes it declares.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedmerge.delta.state_dict import StateDict, accumulation_dtype
from fedmerge.errors import ConfigError, IncompatibleDeltasError, StoreIntegrityError
from fedmerge.store.blobs import BlobBackend, read_blob, write_atomic
from fedmerge.store.catalog import Catalog, VersionRow
from fedmerge.store.errors import UnknownVersionError
from fedmerge.store.manifest import TensorEntry, Version, from_json, is_version_id, materialisable
from fedmerge.store.safetensors_format import TensorSpec, dtype_from_name


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data`` (what the catalog records of a manifest)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor changed from version ``a`` to ``b``: ‖θ_a‖₂, ‖θ_b‖₂, ‖θ_b − θ_a‖₂ (fp64)."""

    name: str
    norm_a: float
    norm_b: float
    change_norm: float

    @property
    def relative_change(self) -> float:
        """‖θ_b − θ_a‖₂ / ‖θ_a‖₂ (inf when θ_a = 0 and something changed, 0 when nothing did)."""
        if self.norm_a == 0.0:
            return 0.0 if self.change_norm == 0.0 else float("inf")
        return self.change_norm / self.norm_a


@dataclass(frozen=True)
class Diff:
    a: str
    b: str
    tensors: list[TensorDiff]

    @property
    def total_change_norm(self) -> float:
        """‖θ_b − θ_a‖₂ over all tensors together."""
        return float(sum(t.change_norm**2 for t in self.tensors) ** 0.5)


@dataclass(frozen=True)
class Lineage:
    """The ancestry graph of ``version``: every ancestor (itself included) → its parents, in order."""

    version: str
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def ancestors(self) -> list[str]:
        """All nodes, newest (highest sequence) first."""
        return sorted(self.parents, reverse=True)

    def edges(self) -> list[tuple[str, str]]:
        """(child, parent) pairs, newest child first."""
        return [(c, p) for c in self.ancestors() for p in self.parents[c]]

    def roots(self) -> list[str]:
        return [v for v in self.ancestors() if not self.parents[v]]


class TensorView(Mapping[str, torch.Tensor]):
    """A read-only mapping name → tensor that reads each tensor from the store when it is looked up.

    Nothing is cached: memory holds the tensors the caller keeps. ``shapes`` and ``dtypes`` come from
    the manifest without reading a blob."""

    def __init__(self, specs: Sequence[TensorSpec], read: Callable[[str], torch.Tensor]) -> None:
        self._specs = {s.name: s for s in specs}
        self._read = read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._specs:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s.shape) for n, s in sorted(self._specs.items())}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: s.dtype for n, s in sorted(self._specs.items())}


class StoreReading:
    """The reading half of :class:`~fedmerge.store.model_store.ModelStore` (see the module doc)."""

    catalog: Catalog
    blobs: BlobBackend
    manifest_dir: Path
    _cache: dict[str, Version]

    def resolve(self, ref: str) -> str:
        """The version id that ``ref`` (an id or an alias) names; :class:`UnknownVersionError` if none."""
        if is_version_id(ref):
            if self.catalog.row(ref) is None:
                raise UnknownVersionError(
                    f"no committed version {ref!r}; `fedmerge store versions` lists them"
                )
            return ref
        target = self.catalog.alias(ref)
        if target is None:
            known = ", ".join(sorted(self.catalog.aliases())) or "none yet"
            raise UnknownVersionError(f"{ref!r} is neither a version id nor an alias (aliases: {known})")
        return target

    def get(self, ref: str) -> Version:
        """The committed version named by id or alias (its manifest checked against the catalog)."""
        vid = self.resolve(ref)
        cached = self._cache.get(vid)
        if cached is not None:
            return cached
        row = self.catalog.row(vid)
        assert row is not None
        version = self.read_manifest(row)
        self._cache[vid] = version
        return version

    def read_manifest(self, row: VersionRow) -> Version:
        """The manifest of a catalog row, read and checked against the row (a missing or altered
        manifest is a :class:`StoreIntegrityError`)."""
        path = self.manifest_dir / f"{row.id}.json"
        raw: bytes | None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            kept = self.blobs.get_manifest(path.name)  # committed by another server on the shared store
            if kept is not None and sha256_bytes(kept) == row.manifest_sha256:
                write_atomic(path, [kept], self.blobs.tmp_dir)
                raw = kept
            else:
                raw = None
        if raw is None:
            raise StoreIntegrityError(
                f"version {row.id}: manifest {path} is missing although the catalog lists it; "
                "restore it from a backup"
            ) from None
        actual = sha256_bytes(raw)
        if actual != row.manifest_sha256:
            raise StoreIntegrityError(
                f"version {row.id}: manifest {path} hashes to {actual}, the catalog recorded "
                f"{row.manifest_sha256}: it was modified after commit; restore it from a backup"
            )
        version = from_json(raw, source=str(path))
        if version.id != row.id or version.content_hash != row.content_hash:
            raise StoreIntegrityError(
                f"version {row.id}: manifest {path} describes {version.id} ({version.content_hash}); "
                "restore the right manifest from a backup"
            )
        return version

    def root_of(self, version: Version) -> Version:
        """The ``full`` version at the end of ``version``'s first-parent chain."""
        return version if version.kind == "full" else self.get(version.base_version or "")

    def chain(self, version: Version) -> list[Version]:
        """[root, …, version] following first parents."""
        out = [version]
        while out[-1].kind != "full":
            out.append(self.get(out[-1].parents[0]))
        return out[::-1]

    def _read(self, version: Version, name: str, entry: TensorEntry, *, part: str = "tensor") -> torch.Tensor:
        return read_blob(self.blobs, entry.blob, what=f"version {version.id} {part} {name!r}")

    def load_delta(self, ref: str | Version) -> StateDict:
        """The tensors stored in the version (a delta, or the weights of a ``full`` root)."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        return {n: self._read(version, n, e) for n, e in sorted(version.tensors.items())}

    def read_files(self, ref: str | Version) -> dict[str, bytes]:
        """The non-tensor files kept with the version's root (file name → bytes, each re-hashed)."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        root = self.root_of(version)
        return {
            n: self._read(root, n, e, part="file").numpy().tobytes() for n, e in sorted(root.files.items())
        }

    def load_state(self, ref: str | Version) -> StateDict | None:
        """The aggregator state stored with the version, or ``None`` if it has none."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        if not version.state:
            return None
        return {n: self._read(version, n, e, part="state") for n, e in sorted(version.state.items())}

    def materialized_specs(self, ref: str | Version) -> list[TensorSpec]:
        """Names, dtypes and shapes of the materialised weights, in the order they are yielded."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        root = self.root_of(version)
        return [TensorSpec(n, dtype_from_name(e.dtype), e.shape) for n, e in sorted(root.tensors.items())]

    def iter_materialized(self, ref: str | Version) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, θ) of the full weights, one tensor at a time, sorted by name.

        θ = θ_root + Σ_k τ_k over the first-parent chain, summed in fp32 (fp64 stays fp64) and cast
        to the root's dtype; non-floating tensors come from the root unchanged. Memory: one tensor
        (plus the one being added), whatever the model size.
        """
        version = ref if isinstance(ref, Version) else self.get(ref)
        root, deltas = materialisable(version, self.chain(version))
        for name in sorted(root.tensors):
            yield name, self._materialized(root, deltas, name)

    def weights_view(self, ref: str | Version) -> TensorView:
        """θ of the version as a :class:`TensorView`: each tensor materialised when it is looked up."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        return TensorView(
            self.materialized_specs(version), lambda name: self.materialized_tensor(version, name)
        )

    def delta_view(self, ref: str | Version) -> TensorView:
        """The tensors stored in the version (:meth:`load_delta`) as a :class:`TensorView`."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        specs = [TensorSpec(n, dtype_from_name(e.dtype), e.shape) for n, e in sorted(version.tensors.items())]
        return TensorView(specs, lambda name: self._read(version, name, version.tensors[name]))

    def materialized_tensor(self, ref: str | Version, name: str) -> torch.Tensor:
        """θ[name] of the version's full weights, as :meth:`iter_materialized` yields it."""
        version = ref if isinstance(ref, Version) else self.get(ref)
        chain = self.chain(version)
        if name not in chain[0].tensors:
            raise KeyError(name)
        return self._materialized(chain[0], chain[1:], name)

    def _materialized(self, root: Version, deltas: Sequence[Version], name: str) -> torch.Tensor:
        weight = self._read(root, name, root.tensors[name])
        if not weight.is_floating_point() or not deltas:
            return weight
        acc = weight.to(accumulation_dtype(weight.dtype))
        for d in deltas:
            if d.kind != "task_vector":
                raise ConfigError(f"version {d.id} of kind {d.kind!r} does not materialise; densify it first")
            acc += self._read(d, name, d.tensors[name]).to(acc.dtype)
        return acc.to(weight.dtype)

    def iter_total_delta(self, ref: str | Version) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, Σ_k τ_k) over the first-parent chain (θ_version − θ_root), fp32, sorted by name.

        Empty for a ``full`` root. One tensor in memory at a time.
        """
        version = ref if isinstance(ref, Version) else self.get(ref)
        deltas = self.chain(version)[1:]
        if not deltas:
            return
        for d in deltas:
            if d.kind != "task_vector":
                raise ConfigError(
                    f"version {version.id} descends through {d.id} of kind {d.kind!r}; "
                    "only task-vector chains can be summed"
                )
        for name in sorted(deltas[-1].tensors):
            acc: torch.Tensor | None = None
            for d in deltas:
                t = self._read(d, name, d.tensors[name])
                acc = t.to(accumulation_dtype(t.dtype)) if acc is None else acc + t.to(acc.dtype)
            assert acc is not None
            yield name, acc

    def materialize(self, ref: str | Version) -> StateDict:
        """The full weights of a version as one state dict (see :meth:`iter_materialized`)."""
        return dict(self.iter_materialized(ref))

    # -- listing ---------------------------------------------------------------------------------

    def list(self, limit: int | None = None) -> list[Version]:
        """Every committed version, newest first."""
        return [self.get(v) for v in self.catalog.query_ids(limit=limit)]

    def query(
        self,
        *,
        alias: str | None = None,
        round: int | None = None,
        contributor: str | None = None,
        method: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[Version]:
        """Versions matching every given filter, newest first (``contributor``: an accepted client id)."""
        ids = self.catalog.query_ids(
            round=round, contributor=contributor, method=method, kind=kind, limit=None
        )
        if alias is not None:
            target = self.catalog.alias(alias)
            ids = [i for i in ids if i == target]
        return [self.get(v) for v in (ids if limit is None else ids[:limit])]

    def aliases(self) -> dict[str, str]:
        """Alias → version id."""
        return self.catalog.aliases()

    def aliases_of(self, vid: str) -> builtins.list[str]:
        return sorted(a for a, v in self.catalog.aliases().items() if v == vid)

    # -- lineage and diff ------------------------------------------------------------------------

    def lineage(self, ref: str) -> Lineage:
        """Every ancestor of the version (all parents, not only the first) and its parent edges."""
        start = self.get(ref)
        graph: dict[str, tuple[str, ...]] = {}
        todo = [start.id]
        while todo:
            vid = todo.pop()
            if vid in graph:
                continue
            graph[vid] = self.get(vid).parents
            todo.extend(graph[vid])
        return Lineage(version=start.id, parents=graph)

    def diff(self, a: str, b: str) -> Diff:
        """Per-tensor ‖θ_b − θ_a‖₂ of the materialised weights, streamed tensor by tensor (fp64 norms)."""
        va, vb = self.get(a), self.get(b)
        sa, sb = self.materialized_specs(va), self.materialized_specs(vb)
        if [(s.name, s.shape) for s in sa] != [(s.name, s.shape) for s in sb]:
            raise IncompatibleDeltasError(
                f"versions {va.id} and {vb.id} have different tensor names or shapes (bases "
                f"{self.root_of(va).id} and {self.root_of(vb).id}); diff compares versions of one model"
            )
        out: list[TensorDiff] = []
        for (name, ta), (_, tb) in zip(self.iter_materialized(va), self.iter_materialized(vb), strict=True):
            xa, xb = ta.to(torch.float64), tb.to(torch.float64)
            out.append(TensorDiff(name, float(xa.norm()), float(xb.norm()), float((xb - xa).norm())))
        return Diff(a=va.id, b=vb.id, tensors=out)
