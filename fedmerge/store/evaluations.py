"""Federated evaluations of a committed version, kept beside the store's immutable versions.

A version's manifest (weights, contributors, metrics) is content-addressed and never changes, but a
federated evaluation of that version happens *after* its commit: the server sends the committed
weights to a sample of nodes and aggregates their metrics (:mod:`fedmerge.flower.server.evaluation`). Its
result is an observation about the version, not part of it, so it is recorded here:
``<store>/evaluations/<version id>.json`` holds a JSON list of the evaluations of that version (a
resumed run that evaluates the same version again appends one), each written atomically (temporary
file, fsync, rename). The version must exist; the weights and manifests are never touched.

Each evaluation records the round, the aggregated metrics (weighted by ``num-examples``), the total
number of examples and one entry per sampled node (client label, examples, accepted or the reason it
was dropped). ``fedmerge store show`` and the dashboard's run page read them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.store.blobs import write_atomic
from fedmerge.store.errors import StoreIntegrityError
from fedmerge.store.manifest import utc_now

if TYPE_CHECKING:
    from fedmerge.store.model_store import ModelStore

EVALUATIONS_DIR = "evaluations"


@dataclass(frozen=True)
class NodeEvaluation:
    """One sampled node's evaluate reply: accepted (its metrics entered the aggregate) or dropped."""

    client_id: str
    num_examples: int
    accepted: bool
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class NodeOutcomes:
    """``accepted`` and ``dropped``: the split of an evaluation's ``nodes`` by outcome (a mixin)."""

    nodes: list[NodeEvaluation]

    @property
    def accepted(self) -> list[NodeEvaluation]:
        return [n for n in self.nodes if n.accepted]

    @property
    def dropped(self) -> list[NodeEvaluation]:
        return [n for n in self.nodes if not n.accepted]


@dataclass(frozen=True)
class Evaluation(NodeOutcomes):
    """A federated evaluation of ``version`` after ``round``: metrics aggregated over accepted nodes."""

    version: str
    round: int
    metrics: dict[str, float]
    num_examples: int
    nodes: list[NodeEvaluation]
    recorded_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(doc: Mapping[str, Any]) -> Evaluation:
        return Evaluation(
            version=str(doc["version"]),
            round=int(doc["round"]),
            metrics={str(k): float(v) for k, v in doc["metrics"].items()},
            num_examples=int(doc["num_examples"]),
            nodes=[NodeEvaluation(**n) for n in doc["nodes"]],
            recorded_at=str(doc.get("recorded_at", "")),
        )


def _path(store: ModelStore, version_id: str) -> Path:
    return Path(store.root) / EVALUATIONS_DIR / f"{version_id}.json"


def _finite(values: Mapping[str, float], what: str) -> None:
    for key, value in values.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{what} metric {key!r}={value!r} is not a finite number")


def record_evaluation(store: ModelStore, evaluation: Evaluation) -> Evaluation:
    """Append ``evaluation`` to its version's evaluations (atomically); returns it with its time.

    Raises :class:`~fedmerge.store.UnknownVersionError` when the version is not committed and
    ValueError for a non-finite metric (nothing is written then)."""
    version = store.get(evaluation.version)
    _finite(evaluation.metrics, "aggregated")
    for node in evaluation.nodes:
        _finite(node.metrics, f"node {node.client_id!r}")
    stamped = Evaluation(
        version.id, evaluation.round, dict(evaluation.metrics), evaluation.num_examples,
        list(evaluation.nodes), utc_now(),
    )  # fmt: skip
    path = _path(store, version.id)
    path.parent.mkdir(exist_ok=True)
    earlier = [e.to_dict() for e in evaluations_of(store, version.id)]
    data = json.dumps([*earlier, stamped.to_dict()], indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(path, [data], Path(store.root) / "tmp")
    return stamped


def evaluations_of(store: ModelStore, version_id: str) -> list[Evaluation]:
    """The recorded evaluations of ``version_id``, oldest first ([] when there are none). A file that
    cannot be read is a :class:`~fedmerge.store.StoreIntegrityError` naming it."""
    path = _path(store, version_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        docs = json.loads(raw)
        return [Evaluation.from_dict(d) for d in docs]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreIntegrityError(f"evaluation record {path} is unreadable ({exc!r}); move it out") from None


def latest_evaluations(store: ModelStore, version_ids: Sequence[str]) -> dict[str, Evaluation]:
    """The last recorded evaluation of each of ``version_ids`` that has one."""
    out: dict[str, Evaluation] = {}
    for vid in version_ids:
        found = evaluations_of(store, vid)
        if found:
            out[vid] = found[-1]
    return out
