"""Judging a round's replies: every reply is read, checked and folded (or held), never trusted.

:meth:`RoundState.judge` takes one reply of any wire form and records an accepted or rejected
:class:`ReplyOutcome`; it never raises. The forms are read to one :class:`Submission` (what the reply
submits: its client, examples, round, digest and tensors), then one path applies the checks:

1. the wire form, read by its own reader — a fedmerge package inline (ArrayRecord ``"fedmerge.delta"``)
   or through the bulk endpoint (a reference resolved and verified in the spool) is decoded by one
   decoder (:func:`~fedmerge.codec.stream_reader.open_task_vector_stream`, then each tensor decoded,
   a large package's several at once: :func:`~fedmerge.flower.server.spool_merge.tensor_map`; parsed
   once: size ≤ ``max-package-bytes``, header, base id **and** hash, kind ``task_vector``, names and
   shapes against the base, checksums); a plain Flower reply (full weights in ``"arrays"``) gives
   τ = θ_reply − θ_base (:func:`~fedmerge.flower.transport.dense_record_to_task_vector`, each ``.npy``
   header judged before its data);
2. the checks every form shares, each written once (:meth:`RoundState._admit`): the round the package
   names, ``1 ≤ num-examples ≤ max-num-examples``, every value within the magnitude bound
   (:func:`~fedmerge.delta.rules.value_bound`), and a tensor the reply leaves out filled as zero change
   (:func:`~fedmerge.submission.fill_missing`);
3. one accepted reply per node and per submission digest, the Fisher side package when the aggregator
   needs it, anomaly screening (:func:`~fedmerge.flower.server.safeguards.screen_delta`), then the fold
   into the streaming aggregator — or, for the tensor-major merge, the reply is held
   (:class:`~fedmerge.flower.server.spool_merge.HeldReply`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedmerge.aggregators import Aggregator, create
from fedmerge.codec import DecodedPackage, DecodeLimits
from fedmerge.codec.stream_reader import open_task_vector_stream
from fedmerge.codec.validate import TensorHeader
from fedmerge.delta.rules import StaleOrInvalid, check_values, value_bound
from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import floating_names, shapes_of
from fedmerge.errors import InvalidSubmission
from fedmerge.flower.client.bulk import REF_SHA_KEY, REF_SIZE_KEY
from fedmerge.flower.config import RunConfig, needs_fisher
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DTYPES_RECORD,
    METRICS_RECORD,
    DtypeRecordError,
    dtypes_of,
)
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint
from fedmerge.flower.server.safeguards import Reference, screen_delta
from fedmerge.flower.server.spool_merge import (
    DeltaTensor,
    HeldReply,
    SpooledDelta,
    aggregator_args,
    carried_entries,
    decode_workers,
    tensor_map,
)
from fedmerge.flower.transport import (
    FISHER_RECORD_KEY,
    RECORD_KEY,
    STYPE,
    MissingPackage,
    dense_record_to_task_vector,
    record_to_package,
)
from fedmerge.store import Contributor, Version
from fedmerge.submission import fill_missing

log = logging.getLogger("fedmerge.rounds")

# Flower's error replies for a message whose TTL (= round-deadline-s) expired before its reply came
EXPIRED_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
MAX_REASON = 400  # characters of a client's error kept in the manifest (its head and its end)
CLIENT_ID_KEY = "client-id"  # a reply's ConfigRecord "config" may name the node's client id with it
MAX_CLIENT_ID = 128
MAX_ROUND_REPLIES = 1 << 16  # replies one round may fold: with max-num-examples, the accumulator's weight


class MalformedReply(InvalidSubmission):
    """A reply whose content could not be parsed at all (an unexpected error while judging it)."""


@dataclass(frozen=True)
class ReplyOutcome:
    """What happened to one sampled node's reply in one round."""

    node_id: int
    client_id: str
    accepted: bool
    reason: str | None = None
    num_examples: int = 0
    submission_hash: str = ""
    wire_bytes: int = 0
    dense_bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    codec: dict[str, Any] | None = None  # what the reply used on the wire (see RoundState.judge)

    @property
    def fedmerge_client(self) -> bool:
        """True when the reply was a fedmerge package: the node caches its base in ``context.state``."""
        return self.codec is not None and self.codec.get("format") == STYPE

    def contributor(self) -> Contributor:
        return Contributor(
            self.client_id, self.num_examples, self.submission_hash, self.accepted, self.reason,
            codec=self.codec,
        )  # fmt: skip


def deadline_reason(deadline_s: float) -> str:
    """The recorded reason of a node that did not reply in time (by our clock or by the message's TTL)."""
    return f"timeout: no reply within round-deadline-s={deadline_s:g}"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, bytes) of dense tensors in name order: the identity of a reply that has no
    package bytes (a plain Flower reply)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def _metrics_of(content: RecordDict) -> dict[str, float]:
    """The finite numeric metrics of a reply's ``metrics`` record; others are left out (never raises)."""
    record = content.metric_records.get(METRICS_RECORD)
    if record is None:
        return {}
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            f = float(v)
            if math.isfinite(f):
                out[str(k)] = f
    return out


def reply_num_examples(content: RecordDict) -> int:
    """``num-examples`` of a dense reply's ``metrics`` record: an integer (an integral float is taken),
    not a bool, string, list, NaN or infinity; else :class:`StaleOrInvalid` saying what was sent."""
    record = content.metric_records.get(METRICS_RECORD)
    return whole_num_examples(
        None if record is None else record.get("num-examples"),
        StaleOrInvalid,
        missing=f"dense reply has no 'num-examples' in MetricRecord {METRICS_RECORD!r}; report the number "
        "of local training examples",
        hint="; report the number of local training examples as an int",
    )


def whole_num_examples(value: Any, error: type[Exception], *, missing: str, hint: str = "") -> int:
    """``value`` read as a reply's ``num-examples``: an int, or a float that is a whole finite number;
    None raises ``error(missing)``, a bool, string, list, NaN or infinity ``error`` naming what was
    sent (``hint`` appended to the wrong-type message). The range is the caller's to check."""
    if value is None:
        raise error(missing)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"num-examples is {type(value).__name__} {str(value)[:40]!r}, not a number{hint}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise error(f"num-examples={value!r} is not a whole finite number of examples")
    return int(value)


def shorten_middle(text: str, limit: int = MAX_REASON) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and its end with `` … `` between: a
    client's error says what went wrong in its first line and where at its end."""
    if len(text) <= limit:
        return text
    head = (limit - 3) * 2 // 3
    return f"{text[:head]} … {text[len(text) - (limit - 3 - head) :]}"


def reply_client_id(content: RecordDict) -> str | None:
    """The node's client id as its reply states it: ``"client-id"`` in the reply's ConfigRecord
    ``"config"`` (a plain Flower client's node config ``client-id``), whitespace collapsed and cut to
    :data:`MAX_CLIENT_ID` characters; None when absent or not a non-empty string. A label only: the
    round's identity of a reply is its Flower node."""
    record = content.config_records.get(CONFIG_RECORD)
    value = None if record is None else record.get(CLIENT_ID_KEY)
    if not isinstance(value, str):
        return None
    label = " ".join(value.split())[:MAX_CLIENT_ID]
    return label or None


def dense_bytes_of(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """fp32 bytes of a dense delta with these shapes (what Flower's dense exchange sends)."""
    return 4 * sum(math.prod(s) for s in shapes.values())


_VALUE_NAMES = {"float32": "fp32", "float16": "fp16", "float64": "fp64", "bfloat16": "bf16"}


def codec_of_headers(
    headers: Iterable[Any], carried: int, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """What a fedmerge package actually used: its value encodings and index codings (as declared in
    its tensor ``headers``) and the fraction of the base's coordinates it carries (``carried``)."""
    total = sum(math.prod(s) for s in shapes.values()) or 1
    return {
        "format": STYPE,
        "values": ",".join(sorted({h.values for h in headers})),
        "index": ",".join(sorted({h.index for h in headers})),
        "density": round(carried / total, 6),
    }


@dataclass
class Submission:
    """What one reply submits, as read from its wire form, before the shared checks (``_admit``)."""

    client_id: str  # as the package declares it (a dense reply: the node's label)
    num_examples: int
    round: int | None  # the round the package names; None for a dense reply (it names none)
    digest: str | None  # SHA-256 of the package bytes; None: of the tensors (a dense reply)
    wire_bytes: int
    codec: dict[str, Any]
    what: str  # how a value error names the reply
    load: Callable[[], Mapping[str, DeltaTensor]]  # its tensors as sent (a dense reply converts here)
    spooled: SpooledDelta | None = None  # verified in the spool, values checked (tensor-major merge)


class RoundState:
    """Per-round bookkeeping for validation: seen clients and submissions, the aggregator."""

    def __init__(
        self,
        cfg: RunConfig,
        round_: int,
        base: Version,
        base_weights: Mapping[str, torch.Tensor],
        *,
        max_abs: float | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        fold: bool = True,
    ) -> None:
        """``max_abs``: the magnitude bound on reply values (default: :func:`value_bound` of the base
        with total weight ``max-num-examples × MAX_ROUND_REPLIES``). ``shapes``: the base's floating
        tensors (default: read from ``base_weights``, which may then be a store view). ``fold=False``:
        accepted replies are kept in :attr:`held` for the tensor-major merge
        (:mod:`fedmerge.flower.server.spool_merge`) instead of being folded as they are judged."""
        self.cfg, self.round, self.base = cfg, round_, base
        self.base_weights = base_weights
        if shapes is None:
            self.names = floating_names(base_weights)
            self.shapes = shapes_of({n: base_weights[n] for n in self.names})
        else:
            self.shapes = {n: tuple(shapes[n]) for n in sorted(shapes)}
            self.names = list(self.shapes)
        self.fold = fold
        self.held: list[HeldReply] = []  # accepted replies awaiting the tensor-major merge (fold=False)
        self.dense_bytes = dense_bytes_of(self.shapes)
        self.seen_nodes: set[int] = set()
        self.seen_clients: set[str] = set()
        self.seen_hashes: set[str] = set()
        args = aggregator_args(cfg, round_)
        if cfg.bulk.address:  # large payloads: fold each delta at once, memory independent of the clients
            args.setdefault("group_size", 1)
        self.aggregator: Aggregator = create(cfg.aggregation.name, **args)
        self.aggregator.begin(self.shapes)
        self.limits = DecodeLimits(max_package_bytes=cfg.rounds.max_package_bytes).within_base(
            self.shapes, factor=2
        )
        self.max_abs = (
            value_bound(self.shapes, total_weight=float(cfg.rounds.max_num_examples) * MAX_ROUND_REPLIES)
            if max_abs is None
            else max_abs
        )
        self.accepted_replies: list[tuple[int, Message]] = []  # kept to re-merge without an offender
        self.tainted = False  # an aggregator.add raised part-way: the fold must be redone
        self.reference = Reference(base.id)  # screening reference (safeguards.reference_for)
        self.scores: dict[str, dict[str, Any]] = {}  # per-client anomaly scores
        self.privacy: dict[str, Any] | None = None  # the DP release record, set at finalize
        self.bulk: BulkEndpoint | None = None  # resolves bulk references (large payloads)
        self.needs_fisher = needs_fisher(cfg)  # each reply carries its diagonal Fisher beside the delta
        # node id → its client id, as its replies state it (kept across rounds by the Federation): a
        # node is named so even in a reply without content (a client error, a timeout)
        self.labels: dict[int, str] = {}
        self.attempt = 0

    def fresh(self, base_weights: Mapping[str, torch.Tensor] | None = None) -> RoundState:
        """An empty in-memory state (``fold=True``) for the same round, base, bound, screening
        reference, labels and bulk endpoint (to judge replies again, e.g. without an offender)."""
        weights = self.base_weights if base_weights is None else base_weights
        new = RoundState(self.cfg, self.round, self.base, weights, max_abs=self.max_abs)
        new.reference, new.labels = self.reference, self.labels
        new.bulk, new.attempt = self.bulk, self.attempt
        return new

    def judge(self, node_id: int, reply: Message) -> ReplyOutcome:
        """Validate one reply and fold it into the aggregator if it is accepted. Never raises: every
        failure while reading the reply (of any class) is a recorded rejection of that reply."""
        default_id = self.labels.get(node_id, f"node-{node_id}")
        client_id = default_id
        metrics: dict[str, float] = {}
        folding = False
        spooled: SpooledDelta | None = None
        try:
            if reply.has_error():
                err = reply.error
                if err.code in EXPIRED_CODES:  # Flower's answer once the message's TTL (the deadline) ran out
                    timeout = deadline_reason(self.cfg.rounds.round_deadline_s)
                    return ReplyOutcome(node_id, default_id, False, timeout)
                reason = shorten_middle(" ".join(str(err.reason or "").split()))
                return ReplyOutcome(node_id, default_id, False, f"client failed (code {err.code}): {reason}")
            content = reply.content
            metrics = _metrics_of(content)
            claimed = reply_client_id(content)
            if claimed is not None:
                client_id = default_id = self.labels[node_id] = claimed
            sub = self._read(content, node_id, default_id)
            spooled = sub.spooled
            delta, digest = self._admit(sub)
            client_id, n, wire, codec = sub.client_id, sub.num_examples, sub.wire_bytes, sub.codec
            side: dict[str, Any] = {"fisher": self._fisher(content, client_id)} if self.needs_fisher else {}
            self._check_unique(node_id, digest)
            client_id = self._label(client_id, node_id)
            norm = spooled.norm if spooled is not None else None
            screened, weight = screen_delta(
                delta, float(n), client_id, self.cfg, self.reference, self.scores, norm=norm
            )
            if self.fold:
                folding = True
                self.aggregator.add(screened, weight, client_id=client_id, **side)
                folding = False
            else:
                self.held.append(HeldReply(node_id, client_id, weight, screened))
        except InvalidSubmission as exc:
            self.tainted = self.tainted or folding
            if spooled is not None:
                spooled.close()
            reason = f"{type(exc).__name__}: {exc}"
            return ReplyOutcome(node_id, str(client_id), False, reason, metrics=metrics)
        except Exception as exc:  # a reply must never crash the round: anything else is malformed too
            self.tainted = self.tainted or folding
            if spooled is not None:
                spooled.close()
            log.warning("round %d: reply of node %d could not be judged: %r", self.round, node_id, exc)
            text = shorten_middle(" ".join(f"{type(exc).__name__}: {exc}".split()))
            return ReplyOutcome(
                node_id, str(client_id), False, f"MalformedReply: reply could not be read ({text})",
                metrics=metrics,
            )  # fmt: skip
        self.seen_nodes.add(node_id)
        self.seen_clients.add(client_id)
        self.labels.setdefault(node_id, client_id)  # a package's client id names the node's later errors
        self.seen_hashes.add(digest)
        self.accepted_replies.append((node_id, reply))
        return ReplyOutcome(node_id, client_id, True, None, n, digest, wire, self.dense_bytes, metrics, codec)

    # ---------------------------------------------------------------------------------- wire forms

    def _read(self, content: RecordDict, node_id: int, client_id: str) -> Submission:
        """The reply's submission, read by the reader of its wire form (module docstring, step 1)."""
        ref = content.config_records.get(CONFIG_RECORD)
        if ref is not None and REF_SHA_KEY in ref:
            return self._bulk(ref, node_id)
        if RECORD_KEY in content.array_records:
            data = record_to_package(content)
            self._check_size(len(data))
            return self._package(data, hashlib.sha256(data).hexdigest(), len(data))
        return self._dense(content, client_id)

    def _check_size(self, size: int, what: str = "package") -> None:  # before anything is read
        if size > self.cfg.rounds.max_package_bytes:
            raise StaleOrInvalid(
                f"{what} of {size} bytes exceeds max-package-bytes={self.cfg.rounds.max_package_bytes}; "
                "lower codec-density or raise max-package-bytes"
            )

    def _decode(self, buffer: bytes | mmap.mmap) -> tuple[DecodedPackage, list[TensorHeader]]:
        """The one package decoder of the round (module docstring, step 1): (package, tensor headers).
        :func:`~fedmerge.codec.stream_reader.decode_task_vector_stream`'s checks and result, with the
        tensors of a large package decoded on several threads (:func:`~.spool_merge.tensor_map`,
        :func:`~.spool_merge.decode_workers`)."""
        package = open_task_vector_stream(
            buffer, self.shapes, base_id=self.base.id, base_hash=self.base.content_hash, limits=self.limits
        )
        try:
            names = [h.name for h in package.headers]
            workers = decode_workers(len(buffer))
            tensors = dict(zip(names, tensor_map(package.decode, names, workers), strict=True))
            dtypes = {h.name: h.dtype for h in package.headers}
            return DecodedPackage(package.meta, tensors, dtypes, package.digest), package.headers  # type: ignore[arg-type]
        finally:
            package.release()

    def _package(
        self, buffer: bytes | mmap.mmap, digest: str, size: int, extra: Mapping[str, Any] | None = None
    ) -> Submission:
        """A fedmerge package (inline bytes or a memory map of a spooled object), decoded once."""
        pkg, headers = self._decode(buffer)
        meta, tensors = pkg.meta, pkg.tensors
        carried = sum(carried_entries(t) for t in tensors.values())
        codec = {**codec_of_headers(headers, carried, self.shapes), **(extra or {})}
        return Submission(
            meta.client_id, meta.num_examples, meta.round, digest, size, codec,
            f"package of {meta.client_id!r}", lambda: tensors,
        )  # fmt: skip

    def _bulk(self, ref: ConfigRecord, node_id: int) -> Submission:
        """A package uploaded through the bulk endpoint: the reference is resolved and the spooled
        object verified (:meth:`BulkEndpoint.resolve`) before the same checks as an inline package.
        In memory it is read tensor by tensor from a memory map (never whole); for the tensor-major
        merge it stays verified where it lies (:class:`~.spool_merge.SpooledDelta`)."""
        if self.bulk is None:
            raise StaleOrInvalid("reply references a bulk object but this server runs no bulk endpoint")
        size = ref.get(REF_SIZE_KEY)
        if isinstance(size, int):
            self._check_size(size)
        sha = ref.get(REF_SHA_KEY)
        path = self.bulk.resolve(sha, size, self.round, self.attempt, node_id)
        bulk = {"transport": "bulk"}
        if self.fold:
            with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return self._package(mm, str(sha), int(size), bulk)  # type: ignore[arg-type]
        pending = self.bulk.take_verified(str(sha), self.round, self.attempt, node_id)
        # verified as the upload completed (or still being verified: wait for it), else verified now
        spooled = pending.result() if pending is not None else self.open_spooled(path)
        assert isinstance(spooled, SpooledDelta)
        try:
            meta = spooled.meta
            codec = {**codec_of_headers(spooled.headers, spooled.carried, self.shapes), **bulk}
            return Submission(
                meta.client_id, meta.num_examples, meta.round, str(sha), int(size), codec,  # type: ignore[arg-type]
                f"package of {meta.client_id!r}", lambda: spooled, spooled,
            )  # fmt: skip
        except BaseException:
            spooled.close()
            raise

    def open_spooled(self, path: Path) -> SpooledDelta:
        """A spooled package verified against this round's base, limits and value bound
        (:class:`~.spool_merge.SpooledDelta`); raises what the judge records as the rejection."""
        return SpooledDelta(
            path, self.shapes, base_id=self.base.id, base_hash=self.base.content_hash,
            limits=self.limits, max_abs=self.max_abs,
        )  # fmt: skip

    def verify_uploads_as_they_arrive(self) -> None:
        """For the tensor-major merge (``fold=False``) with a bulk endpoint: verify each node's bulk
        upload as soon as it completes (:meth:`open_spooled`, on the endpoint's threads), so that its
        reply, when it arrives, finds the package already checked
        (:meth:`~.bulk_endpoint.BulkEndpoint.verify_on_arrival`). Every check still applies: the
        reference is resolved as before, and a verification that failed is the reply's rejection."""
        if self.bulk is not None and not self.fold:
            self.bulk.verify_on_arrival(self.round, self.attempt, self.open_spooled)

    def _dense(self, content: RecordDict, client_id: str) -> Submission:
        """A plain Flower reply: full weights in ``"arrays"`` (or in its only ArrayRecord)."""
        records = dict(content.array_records)
        if ARRAYS_RECORD in records:
            records = {ARRAYS_RECORD: records[ARRAYS_RECORD]}
        if len(records) != 1:
            raise StaleOrInvalid(
                f"reply carries neither a fedmerge package nor its weights in ArrayRecord "
                f"{ARRAYS_RECORD!r} (ArrayRecords: {sorted(content.array_records)})"
            )
        key = next(iter(records))
        arrays = records[key]

        def load() -> Mapping[str, DeltaTensor]:
            try:  # the reply may say which of its fp32 tensors are widened bf16 ("fedmerge.dtypes")
                dtypes_of(content.config_records.get(DTYPES_RECORD), arrays.keys())
            except DtypeRecordError as exc:
                raise StaleOrInvalid(str(exc)) from None
            delta = dense_record_to_task_vector(content, self.base_weights, key=key)
            names = sorted({_VALUE_NAMES.get(str(arrays[n].dtype), str(arrays[n].dtype)) for n in delta})
            codec.update(values=",".join(names))
            return delta

        codec: dict[str, Any] = {"format": "dense", "values": "", "density": 1.0}
        wire = sum(len(a.data) for a in arrays.values())
        n = reply_num_examples(content)
        return Submission(client_id, n, None, None, wire, codec, f"dense reply of {client_id!r}", load)

    # ---------------------------------------------------------------------------------- shared checks

    def _admit(self, sub: Submission) -> tuple[Mapping[str, DeltaTensor], str]:
        """The checks every submission meets, each written once (module docstring, step 2): the round
        it names, ``1 ≤ num-examples ≤ max-num-examples``, its values within :attr:`max_abs` (a spooled
        package checked them as it was verified), and the tensors it leaves out filled as zero
        change. Returns (τ over the base's floating tensors, the submission's digest)."""
        if sub.round is not None and sub.round != self.round:
            raise StaleOrInvalid(f"stale: package is for round {sub.round}, this is round {self.round}")
        self._check_examples(sub.num_examples, sub.client_id)
        tensors = sub.load()
        if sub.spooled is None:
            check_values(tensors, self.max_abs, sub.what)
            tensors = fill_missing(tensors, self.shapes)  # partial: missing tensors are zero change
        digest = sub.digest if sub.digest is not None else tensors_digest(tensors)  # type: ignore[arg-type]
        return tensors, digest

    def _fisher(self, content: RecordDict, client_id: str) -> dict[str, torch.Tensor]:
        """The client's diagonal Fisher: a package in ArrayRecord ``"fedmerge.fisher"`` judged by the same
        rules as a delta package (size, base, shapes, round, value bound), densified; the aggregator
        refuses negative or non-finite entries. A tensor the package leaves out has F = 0."""
        try:
            data = record_to_package(content, FISHER_RECORD_KEY)
        except MissingPackage as exc:
            raise StaleOrInvalid(
                f"the aggregator {self.cfg.aggregation.name!r} merges with each client's diagonal "
                f"Fisher: {exc}"
            ) from None
        self._check_size(len(data), "Fisher package")
        pkg, _ = self._decode(data)
        if pkg.meta.round != self.round or pkg.meta.client_id != client_id:
            raise StaleOrInvalid(
                f"the Fisher package is for client {pkg.meta.client_id!r}, round {pkg.meta.round}; "
                f"its delta is client {client_id!r}'s in round {self.round}"
            )
        check_values(pkg.tensors, self.max_abs, f"Fisher of {client_id!r}")
        filled = fill_missing(pkg.tensors, self.shapes)
        return {k: (v.to_dense() if isinstance(v, SparseTensor) else v) for k, v in filled.items()}

    def _check_examples(self, n: int, client_id: str) -> None:
        if not 1 <= n <= self.cfg.rounds.max_num_examples:
            raise StaleOrInvalid(
                f"num-examples={n} from {client_id!r} is outside [1, max-num-examples="
                f"{self.cfg.rounds.max_num_examples}]; report the number of local training examples"
            )

    def _check_unique(self, node_id: int, digest: str) -> None:
        """One accepted reply per node and per submission. Identity is the Flower node (authenticated
        by SuperNode auth in a deployment), not the client id a package declares about itself: keying
        on that would let any node that claims a peer's id first get the peer rejected."""
        if node_id in self.seen_nodes:
            raise StaleOrInvalid(f"duplicate: node {node_id} already replied in round {self.round}")
        if digest in self.seen_hashes:
            raise StaleOrInvalid(f"duplicate: submission {digest[:12]} was already accepted this round")

    def _label(self, client_id: str, node_id: int) -> str:
        """The package's client id, qualified by the node when another node already used it."""
        if client_id not in self.seen_clients:
            return client_id
        log.warning("round %d: node %d reuses client id %r", self.round, node_id, client_id)
        return f"{client_id}@node-{node_id}"
