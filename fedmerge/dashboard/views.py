"""What the dashboard's pages show, read from a model store through its public API (no web types here).

Every function takes an open :class:`~fedmerge.store.ModelStore` and returns plain data. Nothing is
written: the store is opened only when its ``store.json`` exists (:func:`open_store`), and every id a
page names is resolved through the catalog (:meth:`ModelStore.resolve`), never used as a path.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmerge.errors import ConfigError, IncompatibleDeltasError
from fedmerge.store import ModelStore, Version
from fedmerge.store.evaluations import latest_evaluations
from fedmerge.store.model_store import STORE_MARKER
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_client import is_s3_url
from fedmerge.store.safetensors_format import dtype_from_name

MAX_PAGE_SIZE = 500
"""The most versions one page lists; a larger ``limit`` is refused (HTTP 400)."""
DEFAULT_PAGE_SIZE = 100
MAX_DIFF_READS = 200_000_000
"""A version page computes the per-tensor diff against its parent only when materialising both reads
at most this many elements: parameters × (length of the version's chain + its parent's), since every
version of a first-parent chain is added in; above it the page says so."""
KEY_METRICS = ("server-accuracy", "server-loss", "clients-test-accuracy", "uplink-bytes", "downlink-bytes")


class NotAStoreError(ConfigError):
    """The dashboard was pointed at a directory that is not a model store."""


def open_store(root: str | Path, *, s3_endpoint: str | None = None) -> ModelStore:
    """Open the store at ``root`` for reading, on the catalog named by :data:`CATALOG_ENV` if set.

    ``root`` is a directory (:class:`NotAStoreError` unless ``root/store.json`` exists, so a wrong path
    is never turned into a new, empty store) or ``s3://bucket/prefix`` at ``s3_endpoint`` (default
    ``AWS_ENDPOINT_URL``): :class:`NotAStoreError` unless the catalog lists a version, and one that
    names where the catalog is when the bucket holds manifests but the catalog given is empty."""
    catalog = os.environ.get(CATALOG_ENV) or None
    if is_s3_url(root):
        store = ModelStore.open(str(root), catalog=catalog, s3_endpoint=s3_endpoint)
        try:
            _check_s3_store(store, str(root))
        except BaseException:
            store.close()
            raise
        return store
    if not (Path(root) / STORE_MARKER).is_file():
        raise NotAStoreError(
            f"{root} is not a model store (no {STORE_MARKER}); pass --store with the directory that "
            "`fedmerge demo`, `fedmerge init` or a server wrote"
        )
    return ModelStore.open(root, catalog=catalog)


def _check_s3_store(store: ModelStore, url: str) -> None:
    """An ``s3://`` store has no ``store.json`` to look for: it is a store when its catalog lists a
    version. A bucket with manifests and an empty catalog means the catalog is elsewhere."""
    if store.catalog.query_ids(limit=1):
        return
    blobs = store.blobs
    if isinstance(blobs, S3BlobBackend) and blobs.holds_manifests():
        raise NotAStoreError(
            f"{url} holds versions but this catalog lists none: pass the store's catalog with --catalog "
            "postgresql://… (FEDMERGE_CATALOG), or read it where its SQLite catalog is (the s3 cache of "
            "the server that wrote it)"
        )
    raise NotAStoreError(
        f"{url} holds no fedmerge store (no version in its catalog, no manifests in the bucket); check "
        f"the s3:// URL and --s3-endpoint, or create it with `fedmerge init --store {url} --base …`"
    )


CATALOG_ENV = "FEDMERGE_CATALOG"
"""The shared catalog's URL (``postgresql://…``) of a store whose catalog is not inside it."""


# ----------------------------------------------------------------------------------------- helpers


def parse_time(text: str) -> datetime | None:
    """An ISO-8601 timestamp from a manifest or queue row (``None`` if it does not parse)."""
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor entry: ∏ shape × the dtype's item size."""
    numel = math.prod(shape)
    try:
        return numel * dtype_from_name(dtype).itemsize
    except (ConfigError, KeyError, ValueError):
        return 0


def epsilon_of(version: Version) -> float | None:
    """ε spent after this version's DP release (``privacy.epsilon``), ``inf`` when unbounded."""
    if not version.privacy:
        return None
    eps = version.privacy.get("epsilon")
    if eps == "inf":
        return math.inf
    return _number(eps)


def round_seconds(store: ModelStore, version: Version) -> float | None:
    """Round time: ``metrics['round-time-s']`` when recorded, else the time between the first
    parent's commit and this version's (what a round took from the broadcast to the commit)."""
    recorded = _number(version.metrics.get("round-time-s"))
    if recorded is not None:
        return recorded
    if not version.parents:
        return None
    start = parse_time(store.get(version.parents[0]).created_at)
    end = parse_time(version.created_at)
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


# ----------------------------------------------------------------------------------------- versions


@dataclass(frozen=True)
class VersionSummary:
    """One row of the versions page."""

    id: str
    kind: str
    method: str
    round: int | None
    parents: tuple[str, ...]
    accepted: int
    rejected: int
    metrics: dict[str, float]
    aliases: list[str]
    params: str
    created_at: str
    epsilon: float | None


def _params_text(params: dict[str, Any], limit: int = 64) -> str:
    parts = [f"{k}={v}" for k, v in sorted(params.items()) if not isinstance(v, dict | list)]
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(store: ModelStore, version: Version, aliases: dict[str, list[str]]) -> VersionSummary:
    metrics = {k: v for k in KEY_METRICS if (v := _number(version.metrics.get(k))) is not None}
    return VersionSummary(
        id=version.id,
        kind=version.kind,
        method=version.method,
        round=version.round,
        parents=version.parents,
        accepted=sum(1 for c in version.contributors if c.accepted),
        rejected=sum(1 for c in version.contributors if not c.accepted),
        metrics=metrics,
        aliases=aliases.get(version.id, []),
        params=_params_text(version.params),
        created_at=version.created_at,
        epsilon=epsilon_of(version),
    )


def aliases_by_version(store: ModelStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, vid in sorted(store.aliases().items()):
        out.setdefault(vid, []).append(name)
    return out


@dataclass(frozen=True)
class Page:
    """One page of versions, newest first: ``versions[offset : offset + limit]`` of ``total``."""

    versions: list[VersionSummary]
    total: int
    offset: int
    limit: int


def check_page(limit: int, offset: int) -> None:
    """Refuse a page size outside 1..:data:`MAX_PAGE_SIZE` or a negative offset (ConfigError → 400)."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ConfigError(f"limit={limit} must be in 1..{MAX_PAGE_SIZE}")
    if offset < 0:
        raise ConfigError(f"offset={offset} must be ≥ 0")


def versions_page(store: ModelStore, *, limit: int = DEFAULT_PAGE_SIZE, offset: int = 0) -> Page:
    """The versions ``offset … offset + limit − 1`` (newest first) with their summaries."""
    check_page(limit, offset)
    ids = store.catalog.query_ids()
    aliases = aliases_by_version(store)
    chosen = ids[offset : offset + limit]
    return Page([summarize(store, store.get(v), aliases) for v in chosen], len(ids), offset, limit)


@dataclass(frozen=True)
class Rollback:
    """An alias moved back: ``alias`` left ``left`` for ``to`` at ``at``."""

    alias: str
    left: str
    to: str
    at: str


def rollbacks(store: ModelStore) -> list[Rollback]:
    """Every ``rollback`` alias move recorded in the catalog, oldest first."""
    return [
        Rollback(m.name, m.previous, m.version, m.at)
        for m in store.catalog.alias_moves()
        if m.action == "rollback" and m.previous is not None
    ]


# ----------------------------------------------------------------------------------------- one version


@dataclass(frozen=True)
class TensorRow:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class DiffRow:
    name: str
    norm_parent: float
    norm_version: float
    change_norm: float
    relative: float


@dataclass
class VersionDetail:
    """Everything the version page shows."""

    version: Version
    summary: VersionSummary
    manifest_json: str
    tensors: list[TensorRow]
    total_bytes: int
    privacy: dict[str, Any] | None
    diff: list[DiffRow] | None
    diff_note: str | None
    total_change_norm: float | None
    children: list[str] = field(default_factory=list)


def _privacy_view(privacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The DP record without the accountant's internal state (kept in the manifest)."""
    if not privacy:
        return None
    return {k: v for k, v in privacy.items() if k != "accountant"}


def version_detail(store: ModelStore, ref: str) -> VersionDetail:
    """The version page of ``ref`` (id or alias); ``UnknownVersionError`` if the catalog has neither."""
    version = store.get(ref)
    rows = [
        TensorRow(name, e.dtype, e.shape, tensor_bytes(e.dtype, e.shape))
        for name, e in sorted(version.tensors.items())
    ]
    diff: list[DiffRow] | None = None
    note: str | None = None
    total_change: float | None = None
    if not version.parents:
        note = "a root version has no parent to compare with"
    else:
        parent = version.parents[0]
        numel = sum(math.prod(e.shape) for e in store.root_of(version).tensors.values())
        reads = numel * (len(store.chain(version)) + len(store.chain(store.get(parent))))
        if reads > MAX_DIFF_READS:
            note = (
                f"comparing with {parent} reads {reads:,} elements (the model's {numel:,} parameters "
                f"over both first-parent chains), more than the page's {MAX_DIFF_READS:,}; compare "
                "them offline with ModelStore.diff"
            )
        else:
            try:
                d = store.diff(parent, version.id)
            except (IncompatibleDeltasError, ConfigError) as exc:
                note = f"no diff against {parent}: {exc}"
            else:
                diff = [
                    DiffRow(t.name, t.norm_a, t.norm_b, t.change_norm, t.relative_change) for t in d.tensors
                ]
                total_change = d.total_change_norm
    children = [v for v in reversed(store.catalog.query_ids()) if version.id in store.get(v).parents]
    return VersionDetail(
        version=version,
        summary=summarize(store, version, aliases_by_version(store)),
        manifest_json=_manifest_text(version),
        tensors=rows,
        total_bytes=sum(r.bytes for r in rows),
        privacy=_privacy_view(version.privacy),
        diff=diff,
        diff_note=note,
        total_change_norm=total_change,
        children=children,
    )


def _manifest_text(version: Version) -> str:
    import json

    doc = json.loads(version.to_json())
    if isinstance(doc.get("privacy"), dict) and "accountant" in doc["privacy"]:
        doc["privacy"]["accountant"] = "(accountant state, kept in the manifest)"
    return json.dumps(doc, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunPoint:
    """One version of the run: x is its round (or sequence number when it has no round)."""

    id: str
    x: float
    round: int | None
    metrics: dict[str, float]
    seconds: float | None
    epsilon: float | None
    accepted: int
    rejected: int
    # the federated evaluation recorded beside the version (fedmerge/store/evaluations.py): its
    # metrics weighted by num-examples, and how many nodes were accepted / dropped
    evaluation: dict[str, float] = field(default_factory=dict)
    evaluated: int = 0
    evaluate_dropped: int = 0


@dataclass(frozen=True)
class Run:
    """The first-parent chain ending at ``head`` (root excluded), oldest first."""

    head: str
    root: str
    points: list[RunPoint]

    def series(self, key: str) -> list[tuple[float, float]]:
        return [(p.x, p.metrics[key]) for p in self.points if key in p.metrics]

    def evaluation_series(self, limit: int = 6) -> list[tuple[str, list[tuple[float, float]]]]:
        """One series per federated-evaluation metric (the ``limit`` most reported names, then by name)."""
        counts: dict[str, int] = {}
        for p in self.points:
            for key in p.evaluation:
                counts[key] = counts.get(key, 0) + 1
        names = sorted(counts, key=lambda k: (-counts[k], k))[:limit]
        points = self.points
        return [(k, [(p.x, p.evaluation[k]) for p in points if k in p.evaluation]) for k in sorted(names)]


def default_head(store: ModelStore) -> str | None:
    """``latest`` when that alias exists, else the newest version; ``None`` for an empty store."""
    aliases = store.aliases()
    if "latest" in aliases:
        return aliases["latest"]
    ids = store.catalog.query_ids(limit=1)
    return ids[0] if ids else None


def run_view(store: ModelStore, ref: str, *, limit: int = MAX_PAGE_SIZE) -> Run:
    """The last ``limit`` versions of ``ref``'s first-parent chain with their per-round metrics."""
    head = store.get(ref)
    chain = store.chain(head) if head.kind != "full" else [head]
    root = chain[0]
    points: list[RunPoint] = []
    shown = chain[1:][-limit:]
    evaluations = latest_evaluations(store, [v.id for v in shown])
    for v in shown:
        metrics = {k: n for k, val in v.metrics.items() if (n := _number(val)) is not None}
        ev = evaluations.get(v.id)
        points.append(
            RunPoint(
                id=v.id,
                x=float(v.round if v.round is not None else v.sequence),
                round=v.round,
                metrics=metrics,
                seconds=round_seconds(store, v),
                epsilon=epsilon_of(v),
                accepted=sum(1 for c in v.contributors if c.accepted),
                rejected=sum(1 for c in v.contributors if not c.accepted),
                evaluation={} if ev is None else dict(ev.metrics),
                evaluated=0 if ev is None else len(ev.accepted),
                evaluate_dropped=0 if ev is None else len(ev.dropped),
            )
        )
    return Run(head=head.id, root=root.id, points=points)


# ----------------------------------------------------------------------------------------- live refresh


def fingerprint(store: ModelStore, extra: str = "") -> str:
    """Changes whenever a version is committed or an alias moves (what the pages poll for)."""
    newest = store.catalog.query_ids(limit=1)
    moves = store.catalog.alias_moves()
    text = f"{newest}|{len(moves)}|{moves[-1].seq if moves else 0}|{extra}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "NotAStoreError",
    "Page",
    "Rollback",
    "Run",
    "VersionDetail",
    "VersionSummary",
    "open_store",
    "rollbacks",
    "run_view",
    "version_detail",
    "versions_page",
]
