"""The version manifest: everything that says what a version is and what made it.

One JSON document per version (``manifests/<id>.json``), immutable once committed. Its
``content_hash`` is the sha256 of the canonical JSON (sorted keys, no whitespace) of every field
except ``id``, ``content_hash`` and ``created_at``; it includes the parents' content hashes, so a
version's hash pins its whole ancestry (a Merkle chain), and two commits of the same content get
the same hash whatever id they were given.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import fedmerge
from fedmerge.errors import ConfigError, StoreIntegrityError

Kind = Literal["full", "task_vector", "lora"]
KINDS: tuple[str, ...] = ("full", "task_vector", "lora")
MANIFEST_FORMAT_VERSION = fedmerge.FORMAT_VERSION


@dataclass(frozen=True)
class Contributor:
    """One client's part in a merge; ``submission_hash`` is the sha256 of what it sent.

    ``codec`` (optional) is what the submission actually used on the wire, e.g. ``{"format":
    "fedmerge-delta-v1", "values": "int8", "density": 0.1}`` or ``{"format": "dense", "values":
    "fp32", "density": 1.0}`` for a plain Flower client; manifests written without it load as None and
    keep their content hash (the key is written only when set).
    """

    client_id: str
    num_examples: int
    submission_hash: str
    accepted: bool = True
    reason: str | None = None
    codec: dict[str, Any] | None = field(default=None, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "client_id": self.client_id,
            "num_examples": self.num_examples,
            "submission_hash": self.submission_hash,
            "accepted": self.accepted,
            "reason": self.reason,
        }
        if self.codec is not None:
            out["codec"] = dict(self.codec)
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Contributor:
        return Contributor(
            client_id=str(d["client_id"]),
            num_examples=int(d["num_examples"]),
            submission_hash=str(d["submission_hash"]),
            accepted=bool(d["accepted"]),
            reason=d.get("reason"),
            codec=dict(d["codec"]) if isinstance(d.get("codec"), dict) else None,
        )


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a version lives: its blob digest, dtype (safetensors name) and shape."""

    blob: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"blob": self.blob, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorEntry:
        return TensorEntry(
            blob=str(d["blob"]), dtype=str(d["dtype"]), shape=tuple(int(x) for x in d["shape"])
        )


@dataclass(frozen=True)
class Version:
    """An immutable model version.

    ``kind == "full"``: ``tensors`` are the weights (a root; no parents). Otherwise ``tensors`` are a
    delta relative to the materialised weights of ``parents[0]``; ``base_version``/``base_hash`` name
    the root full-weights version the chain starts from. ``state`` holds opaque aggregator state.
    ``files`` (roots only) holds the model's non-tensor files (``config.json``, tokenizer files, …):
    file name → blob of their bytes as a 1-D uint8 tensor; every version of the chain is exported
    with its root's files. Empty ``files`` are left out of the JSON, so older manifests keep their hash.
    """

    id: str
    content_hash: str
    kind: str
    parents: tuple[str, ...]
    parent_hashes: tuple[str, ...]
    base_version: str | None
    base_hash: str | None
    name: str | None
    tensors: dict[str, TensorEntry]
    state: dict[str, TensorEntry]
    method: str
    params: dict[str, Any]
    contributors: tuple[Contributor, ...]
    round: int | None
    metrics: dict[str, Any]
    privacy: dict[str, Any] | None
    metadata: dict[str, Any]
    created_at: str
    fedmerge_version: str = fedmerge.__version__
    format_version: int = MANIFEST_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def sequence(self) -> int:
        """The arrival sequence number encoded in the id (``v000012`` → 12)."""
        return sequence_of(self.id)

    @property
    def blobs(self) -> set[str]:
        """Every blob digest this version references (weights/delta, state and files)."""
        return (
            {e.blob for e in self.tensors.values()}
            | {e.blob for e in self.state.values()}
            | {e.blob for e in self.files.values()}
        )

    def content(self) -> dict[str, Any]:
        """The fields covered by ``content_hash`` (``files`` only when there are any)."""
        content: dict[str, Any] = {
            "format_version": self.format_version,
            "fedmerge_version": self.fedmerge_version,
            "kind": self.kind,
            "parents": list(self.parents),
            "parent_hashes": list(self.parent_hashes),
            "base_version": self.base_version,
            "base_hash": self.base_hash,
            "name": self.name,
            "tensors": {k: v.to_dict() for k, v in sorted(self.tensors.items())},
            "state": {k: v.to_dict() for k, v in sorted(self.state.items())},
            "method": self.method,
            "params": self.params,
            "contributors": [c.to_dict() for c in self.contributors],
            "round": self.round,
            "metrics": self.metrics,
            "privacy": self.privacy,
            "metadata": self.metadata,
        }
        if self.files:
            content["files"] = {k: v.to_dict() for k, v in sorted(self.files.items())}
        return content

    def to_json(self) -> str:
        doc = {"id": self.id, "content_hash": self.content_hash, "created_at": self.created_at}
        doc.update(self.content())
        return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"


VERSION_PREFIX = "v"
VERSION_DIGITS = 6


def version_id(sequence: int) -> str:
    """``12`` → ``"v000012"`` (more digits once past 999999; ids still sort by sequence)."""
    return f"{VERSION_PREFIX}{sequence:0{VERSION_DIGITS}d}"


def sequence_of(vid: str) -> int:
    if not is_version_id(vid):
        raise ConfigError(f"{vid!r} is not a version id; ids look like {version_id(12)!r}")
    return int(vid[len(VERSION_PREFIX) :])


def is_version_id(text: str) -> bool:
    digits = text[len(VERSION_PREFIX) :]
    return text.startswith(VERSION_PREFIX) and len(digits) >= VERSION_DIGITS and digits.isdigit()


def check_json_value(value: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming the first key under ``where`` that JSON cannot hold exactly."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(
                f"{where} is {value}, which JSON cannot store; record it as a string or drop it"
            )
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has non-string key {k!r}; JSON object keys must be strings")
            check_json_value(item, f"{where}[{k!r}]")
        return
    raise ConfigError(
        f"{where} is a {type(value).__name__} ({value!r}); manifests hold JSON values only "
        "(None, bool, int, finite float, str, list, dict) — convert it first"
    )


def hash_content(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def build_version(vid: str, created_at: str, **fields: Any) -> Version:
    """A :class:`Version` with ``content_hash`` computed from ``fields``."""
    draft = Version(id=vid, content_hash="", created_at=created_at, **fields)
    return Version(id=vid, content_hash=hash_content(draft.content()), created_at=created_at, **fields)


def _entries(raw: Any) -> dict[str, TensorEntry]:
    return {str(k): TensorEntry.from_dict(v) for k, v in dict(raw).items()}


def from_json(text: str | bytes, *, source: str) -> Version:
    """Parse a manifest; raise :class:`StoreIntegrityError` naming ``source`` if it is not a valid one.

    The content hash is recomputed and must match the recorded one.
    """
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreIntegrityError(
            f"manifest {source} is not valid JSON ({exc}); restore it from a backup"
        ) from None
    if not isinstance(doc, dict):
        raise StoreIntegrityError(f"manifest {source} is not a JSON object; restore it from a backup")
    fmt = doc.get("format_version")
    if fmt != MANIFEST_FORMAT_VERSION:
        raise StoreIntegrityError(
            f"manifest {source} has format_version {fmt!r}; this fedmerge reads {MANIFEST_FORMAT_VERSION} — "
            "open the store with the fedmerge version that wrote it"
        )
    try:
        version = Version(
            id=str(doc["id"]),
            content_hash=str(doc["content_hash"]),
            kind=str(doc["kind"]),
            parents=tuple(str(p) for p in doc["parents"]),
            parent_hashes=tuple(str(p) for p in doc["parent_hashes"]),
            base_version=doc["base_version"],
            base_hash=doc["base_hash"],
            name=doc["name"],
            tensors=_entries(doc["tensors"]),
            state=_entries(doc["state"]),
            method=str(doc["method"]),
            params=dict(doc["params"]),
            contributors=tuple(Contributor.from_dict(c) for c in doc["contributors"]),
            round=doc["round"],
            metrics=dict(doc["metrics"]),
            privacy=doc["privacy"],
            metadata=dict(doc["metadata"]),
            created_at=str(doc["created_at"]),
            fedmerge_version=str(doc["fedmerge_version"]),
            format_version=int(fmt),
            files=_entries(doc.get("files", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreIntegrityError(
            f"manifest {source} is missing or has a malformed field ({exc!r}); restore it from a backup"
        ) from None
    actual = hash_content(version.content())
    if actual != version.content_hash:
        raise StoreIntegrityError(
            f"manifest {source} (version {version.id}) records content hash {version.content_hash} but its "
            f"content hashes to {actual}: it was edited after commit; restore it from a backup"
        )
    if version.kind not in KINDS:
        raise StoreIntegrityError(
            f"manifest {source} has unknown kind {version.kind!r}; expected one of {KINDS}"
        )
    return version


def materialisable(version: Version, chain: list[Version]) -> tuple[Version, list[Version]]:
    """(root, deltas) of ``chain`` = [root, …, ``version``] (first parents); a :class:`ConfigError`
    unless every delta on it is a task vector (θ = θ_root + Σ τ_k: only task-vector chains materialise)."""
    root, deltas = chain[0], chain[1:]
    for d in deltas:
        if d.kind != "task_vector":
            raise ConfigError(
                f"version {version.id} descends through {d.id} of kind {d.kind!r}; only task-vector "
                "chains materialise — densify the LoRA delta (fedmerge.delta.lora) and commit it as "
                "a task_vector"
            )
    return root, deltas
