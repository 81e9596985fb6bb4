"""The round engine: sample, send, pull replies as they arrive, validate, fold, commit — and resume.

One round r against base version v (the store's ``latest``):

1. sample ⌈fraction·N⌉ (at least ``min-clients``, at most N) connected nodes with a generator seeded
   from (seed, r, attempt); the weights of v go only to nodes not yet known to hold them;
2. push one ``train`` message per node (TTL = ``round-deadline-s``) and pull replies incrementally
   until all arrived or the deadline passed; each reply is validated at once (codec validation,
   base version id and hash, round, duplicate client or submission, 1 ≤ num-examples ≤ max) and an
   accepted delta is folded into the streaming aggregator immediately (memory O(P), not O(N·P));
3. with at least ``min-valid`` accepted replies: finalize, evaluate on the task's global test set,
   commit a version (parents = [v], method, exact params, one Contributor per sampled node — accepted
   or rejected with its reason — round r, metrics); otherwise nothing is committed and the round is
   retried (``max-retries``) or the run stops with :class:`RoundAborted`.

Resume: a run starts at round ``latest.round + 1`` from ``latest``; a reply computed against any
other base is rejected as stale; before committing, ``latest`` is re-read and the commit is refused
if it moved (so no round is committed twice). Plain Flower clients replying full weights in an
``ArrayRecord`` are accepted as τ = θ_reply − θ_base (:func:`dense_record_to_task_vector`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedmerge.aggregators import Aggregator, create
from fedmerge.aggregators import get as get_aggregator
from fedmerge.aggregators.kernels import PARALLEL_MIN_ELEMENTS
from fedmerge.aggregators.server_optimizer import round_step, without_optimizer_state
from fedmerge.codec import CodecConfig, DecodeLimits, PackageMeta
from fedmerge.codec.package import read_headers
from fedmerge.codec.stream_reader import decode_task_vector_stream
from fedmerge.delta.rules import NonFiniteMerge, StaleOrInvalid, check_values, value_bound
from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import StateDict, floating_names, shapes_of
from fedmerge.errors import FedMergeError, InvalidSubmission
from fedmerge.flower.client.bulk import REF_SHA_KEY, REF_SIZE_KEY
from fedmerge.flower.client.faults import FaultPlan
from fedmerge.flower.config import RunConfig, needs_fisher
from fedmerge.flower.downlink import apply_weights, compress_update, weights_digest
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    BASE_RECORD,  # noqa: F401  (re-exported for older imports)
    CONFIG_RECORD,
    DTYPES_RECORD,
    FEDMERGE_RECORD,
    METRICS_RECORD,
    UPDATE_META_RECORD,
    UPDATE_RECORD,
    DtypeRecordError,
    dtypes_of,
    widen_for_numpy,
)
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint, bulk_endpoint_for
from fedmerge.flower.server.evaluation import EvaluationReport, evaluation_due, run_evaluation
from fedmerge.flower.server.exchange import POLL_S, exchange
from fedmerge.flower.server.safeguards import (
    Reference,
    anomaly_metadata,
    prior_accountant,
    privatize_round,
    reference_for,
    screen_delta,
)
from fedmerge.flower.server.spool_merge import (
    HeldReply,
    SpooledDelta,
    aggregator_args,
    carried_entries,
    merge_tensor_major,
    spool_fold_blocker,
)
from fedmerge.flower.transport import (
    FISHER_RECORD_KEY,
    RECORD_KEY,
    STYPE,
    MissingPackage,
    dense_record_to_task_vector,
    package_to_record,
    record_to_package,
)
from fedmerge.seeds import labelled_digest
from fedmerge.store import Contributor, ModelStore, TensorView, UnknownVersionError, Version
from fedmerge.submission import decode_task_vector_package, fill_missing

log = logging.getLogger("fedmerge.rounds")

# Flower's error replies for a message whose TTL (= round-deadline-s) expired before its reply came
EXPIRED_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
MAX_REASON = 400  # characters of a client's error kept in the manifest (its head and its end)
CLIENT_ID_KEY = "client-id"  # a reply's ConfigRecord "config" may name the node's client id with it
MAX_CLIENT_ID = 128
MAX_ROUND_REPLIES = 1 << 16  # replies one round may fold: with max-num-examples, the accumulator's weight


class MalformedReply(InvalidSubmission):
    """A reply whose content could not be parsed at all (an unexpected error while judging it)."""


class RoundAborted(FedMergeError, RuntimeError):
    """A round ended with fewer valid replies than ``min-valid`` after every retry; nothing was committed."""


class ConcurrentCommit(FedMergeError, RuntimeError):
    """``latest`` moved while the round ran (another server committed): this round's merge is dropped."""


def check_latest_unmoved(store: ModelStore, base: Version, round_: int) -> None:
    """Raise :class:`ConcurrentCommit` unless ``latest`` is still ``base`` (checked just before a commit)."""
    latest = store.resolve("latest")
    if latest != base.id:
        raise ConcurrentCommit(
            f"round {round_}: latest moved from {base.id} to {latest} while the round ran; "
            "restart the server to resume from the new latest"
        )


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


@dataclass
class RoundReport:
    """A round's result; ``version_id`` is None when nothing was committed."""

    round: int
    attempt: int
    base_version_id: str
    outcomes: list[ReplyOutcome]
    version_id: str | None = None
    downlink_bytes: int = 0
    wall_s: float = 0.0
    merge_s: float = 0.0  # from the last reply judged (or the deadline) to the version committed
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: EvaluationReport | None = None  # the federated evaluation of the committed version

    @property
    def accepted(self) -> list[ReplyOutcome]:
        return [o for o in self.outcomes if o.accepted]

    @property
    def rejected(self) -> list[ReplyOutcome]:
        return [o for o in self.outcomes if not o.accepted]

    @property
    def uplink_bytes(self) -> int:
        return sum(o.wire_bytes for o in self.outcomes)

    @property
    def uplink_dense_bytes(self) -> int:
        return sum(o.dense_bytes for o in self.outcomes if o.wire_bytes)


Evaluator = Callable[[StateDict], dict[str, float]]


def ensure_base(store: ModelStore, make_base: Callable[[], StateDict], name: str) -> Version:
    """The store's ``latest`` version, committing ``make_base()`` as the root if the store is empty."""
    try:
        return store.get("latest")
    except UnknownVersionError:
        store.commit_base(make_base(), name=name)
        return store.get("latest")


def start_round(version: Version) -> int:
    """The round a run resumes at: one past the latest committed round (1 for a bare base)."""
    return (version.round or 0) + 1


def sample_nodes(node_ids: Iterable[int], cfg: RunConfig, round_: int, attempt: int) -> list[int]:
    """⌈fraction·N⌉ nodes, at least ``min-clients`` (if connected), seeded by (seed, round, attempt)."""
    nodes = sorted(node_ids)
    k = min(len(nodes), max(cfg.min_clients, math.ceil(cfg.fraction * len(nodes))))
    rng = random.Random(labelled_digest(cfg.seed, round_, attempt))
    return sorted(rng.sample(nodes, k))


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """Connected node ids once at least ``minimum`` are connected, or whatever is there at the timeout."""
    end = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= end:
            return nodes
        time.sleep(POLL_S * 5)


def train_config(cfg: RunConfig, round_: int, base: Version) -> ConfigRecord:
    """Flower's ``"config"`` record of a ``train`` message: what any client (plain or fedmerge) needs
    to train this round. ``server-round``, ``lr``, ``local-epochs`` and ``batch-size`` are the keys
    Flower's quickstarts read; the rest are fedmerge's task settings (the server is the single source
    of settings). Run-config keys fedmerge does not know (a Flower app's own, :attr:`RunConfig.extra`)
    travel here too, under their own names, so a ClientApp reads them as it would from Flower."""
    return ConfigRecord(
        {
            **cfg.extra,
            "server-round": round_,
            "round": round_,
            "lr": cfg.lr,
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "task": cfg.task,
            "mode": cfg.mode,
            "seed": cfg.seed,
            "partitioner": cfg.partitioner,
            "dirichlet-alpha": cfg.dirichlet_alpha,
            "lora-rank": cfg.lora_rank,
            "lora-alpha": cfg.lora_alpha,
            "device": cfg.client_device,
        }
    )


def fedmerge_config(cfg: RunConfig, round_: int, base: Version) -> ConfigRecord:
    """fedmerge's extras (``"fedmerge.config"``): the base version id and content hash a package must
    name, the codec, and the DP and fault settings; plain Flower clients ignore this record."""
    codec = cfg.codec()
    return ConfigRecord(
        {
            "round": round_,
            "base-version-id": base.id,
            "base-version-hash": base.content_hash,
            "codec-sparsify": codec.sparsify,
            "codec-density": codec.density,
            "codec-values": codec.values,
            "codec-error-feedback": codec.error_feedback,
            **FaultPlan(cfg.fault_dropout, cfg.fault_straggler, cfg.fault_straggler_delay_s).to_record(),
            **dp_train_keys(cfg),
            # > 0: reply with the diagonal Fisher of the fine-tuned model beside the delta
            "fisher-examples": cfg.fisher_examples if needs_fisher(cfg) else 0,
        }
    )


def dp_train_keys(cfg: RunConfig) -> dict[str, Any]:
    """The ``dp-*`` keys a client needs to clip (and in local mode noise); none when DP is off."""
    if cfg.dp() is None:
        return {}
    return {
        "dp-clip-norm": cfg.dp_clip_norm,
        "dp-noise-multiplier": cfg.dp_noise_multiplier,
        "dp-delta": cfg.dp_delta,
        "dp-mode": cfg.dp_mode,
        "dp-noise-seed": cfg.dp_noise_seed,
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    value: Any = None if record is None else record.get("num-examples")
    if value is None:
        raise StaleOrInvalid(
            f"dense reply has no 'num-examples' in MetricRecord {METRICS_RECORD!r}; report the number "
            "of local training examples"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StaleOrInvalid(
            f"num-examples is {type(value).__name__} {str(value)[:40]!r}, not a number; report the number "
            "of local training examples as an int"
        )
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise StaleOrInvalid(f"num-examples={value!r} is not a whole finite number of examples")
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


def package_codec(
    data: bytes,
    tensors: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    limits: DecodeLimits,
) -> dict[str, Any]:
    """What a fedmerge package actually used: its value encodings and index codings (as declared in
    its tensor headers) and the fraction of the base's coordinates it carries."""
    _, _, headers = read_headers(data, limits)
    return codec_of_headers(headers, sum(carried_entries(t) for t in tensors.values()), shapes)


def codec_of_headers(
    headers: Iterable[Any], carried: int, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """:func:`package_codec` from already read tensor headers and the coordinates the package carries."""
    total = sum(math.prod(s) for s in shapes.values()) or 1
    return {
        "format": STYPE,
        "values": ",".join(sorted({h.values for h in headers})),
        "index": ",".join(sorted({h.index for h in headers})),
        "density": round(carried / total, 6),
    }


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
        if cfg.bulk_address:  # large payloads: fold each delta at once, memory independent of the clients
            args.setdefault("group_size", 1)
        self.aggregator: Aggregator = create(cfg.aggregator, **args)
        self.aggregator.begin(self.shapes)
        self.limits = DecodeLimits(max_package_bytes=cfg.max_package_bytes).within_base(self.shapes, factor=2)
        self.max_abs = (
            value_bound(self.shapes, total_weight=float(cfg.max_num_examples) * MAX_ROUND_REPLIES)
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

    def judge(self, node_id: int, reply: Message) -> ReplyOutcome:
        """Validate one reply and fold it into the aggregator if it is accepted. Never raises: every
        failure while reading the reply (of any class) is a recorded rejection of that reply."""
        default_id = self.labels.get(node_id, f"node-{node_id}")
        client_id = default_id
        metrics: dict[str, float] = {}
        folding = False
        delta: Mapping[str, Any] = {}
        try:
            if reply.has_error():
                err = reply.error
                if err.code in EXPIRED_CODES:  # Flower's answer once the message's TTL (the deadline) ran out
                    timeout = deadline_reason(self.cfg.round_deadline_s)
                    return ReplyOutcome(node_id, default_id, False, timeout)
                reason = shorten_middle(" ".join(str(err.reason or "").split()))
                return ReplyOutcome(node_id, default_id, False, f"client failed (code {err.code}): {reason}")
            content = reply.content
            metrics = _metrics_of(content)
            claimed = reply_client_id(content)
            if claimed is not None:
                client_id = default_id = self.labels[node_id] = claimed
            ref = content.config_records.get(CONFIG_RECORD)
            if ref is not None and REF_SHA_KEY in ref:
                client_id, n, digest, wire, delta, codec = self._decode_bulk(ref, node_id)
            elif RECORD_KEY in content.array_records:
                client_id, n, digest, wire, delta, codec = self._decode(record_to_package(content))
            else:
                client_id, n, digest, wire, delta, codec = self._dense(content, default_id)
            side: dict[str, Any] = {"fisher": self._fisher(content, client_id)} if self.needs_fisher else {}
            self._check_unique(node_id, digest)
            client_id = self._label(client_id, node_id)
            norm = delta.norm if isinstance(delta, SpooledDelta) else None
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
            if isinstance(delta, SpooledDelta):
                delta.close()
            reason = f"{type(exc).__name__}: {exc}"
            return ReplyOutcome(node_id, str(client_id), False, reason, metrics=metrics)
        except Exception as exc:  # a reply must never crash the round: anything else is malformed too
            self.tainted = self.tainted or folding
            if isinstance(delta, SpooledDelta):
                delta.close()
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

    def _decode_bulk(
        self, ref: ConfigRecord, node_id: int
    ) -> tuple[str, int, str, int, Mapping[str, Any], dict[str, Any]]:
        """A package uploaded through the bulk endpoint: the reference is resolved and the spooled
        object verified (:meth:`BulkEndpoint.resolve`) before the same checks as an inline package."""
        if self.bulk is None:
            raise StaleOrInvalid("reply references a bulk object but this server runs no bulk endpoint")
        size = ref.get(REF_SIZE_KEY)
        if isinstance(size, int) and size > self.cfg.max_package_bytes:
            raise StaleOrInvalid(
                f"package of {size} bytes exceeds max-package-bytes={self.cfg.max_package_bytes}; "
                "lower codec-density or raise max-package-bytes"
            )
        sha = ref.get(REF_SHA_KEY)
        path = self.bulk.resolve(sha, size, self.round, self.attempt, node_id)
        if not self.fold:  # verified where it lies; merged tensor-major later (spool_merge)
            spooled = SpooledDelta(
                path, self.shapes, base_id=self.base.id, base_hash=self.base.content_hash,
                limits=self.limits, max_abs=self.max_abs,
            )  # fmt: skip
            try:
                if spooled.meta.round != self.round:
                    raise StaleOrInvalid(
                        f"stale: package is for round {spooled.meta.round}, this is round {self.round}"
                    )
                self._check_examples(spooled.meta.num_examples, spooled.meta.client_id)
            except BaseException:
                spooled.close()
                raise
            codec = {**codec_of_headers(spooled.headers, spooled.carried, self.shapes), "transport": "bulk"}
            meta = spooled.meta
            return meta.client_id, meta.num_examples, str(sha), int(size), spooled, codec  # type: ignore[arg-type]
        # read tensor by tensor from a memory map: the package is never whole in memory
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pkg, headers = decode_task_vector_stream(
                mm, self.shapes, base_id=self.base.id, base_hash=self.base.content_hash, limits=self.limits
            )
        meta = pkg.meta
        if meta.round != self.round:
            raise StaleOrInvalid(f"stale: package is for round {meta.round}, this is round {self.round}")
        self._check_examples(meta.num_examples, meta.client_id)
        check_values(pkg.tensors, self.max_abs, f"package of {meta.client_id!r}")
        tensors = fill_missing(pkg.tensors, self.shapes)
        carried = sum(carried_entries(t) for t in pkg.tensors.values())
        codec = {**codec_of_headers(headers, carried, self.shapes), "transport": "bulk"}
        return meta.client_id, meta.num_examples, str(sha), int(size), tensors, codec  # type: ignore[arg-type]

    def _decode(self, data: bytes) -> tuple[str, int, str, int, Mapping[str, Any], dict[str, Any]]:
        if len(data) > self.cfg.max_package_bytes:
            raise StaleOrInvalid(
                f"package of {len(data)} bytes exceeds max-package-bytes={self.cfg.max_package_bytes}; "
                "lower codec-density or raise max-package-bytes"
            )
        pkg = decode_task_vector_package(
            data, self.shapes, base_id=self.base.id, base_hash=self.base.content_hash, limits=self.limits
        )
        meta = pkg.meta
        if meta.round != self.round:
            raise StaleOrInvalid(f"stale: package is for round {meta.round}, this is round {self.round}")
        self._check_examples(meta.num_examples, meta.client_id)
        check_values(pkg.tensors, self.max_abs, f"package of {meta.client_id!r}")
        tensors = fill_missing(pkg.tensors, self.shapes)  # partial: missing tensors are zero change
        codec = package_codec(data, pkg.tensors, self.shapes, self.limits)
        return meta.client_id, meta.num_examples, _sha256(data), len(data), tensors, codec

    def _fisher(self, content: RecordDict, client_id: str) -> dict[str, torch.Tensor]:
        """The client's diagonal Fisher: a package in ArrayRecord ``"fedmerge.fisher"`` judged by the same
        rules as a delta package (size, base, shapes, round, value bound), densified; the aggregator
        refuses negative or non-finite entries. A tensor the package leaves out has F = 0."""
        try:
            data = record_to_package(content, FISHER_RECORD_KEY)
        except MissingPackage as exc:
            raise StaleOrInvalid(
                f"the aggregator {self.cfg.aggregator!r} merges with each client's diagonal Fisher: {exc}"
            ) from None
        if len(data) > self.cfg.max_package_bytes:
            raise StaleOrInvalid(
                f"Fisher package of {len(data)} bytes exceeds max-package-bytes={self.cfg.max_package_bytes}"
            )
        pkg = decode_task_vector_package(
            data, self.shapes, base_id=self.base.id, base_hash=self.base.content_hash, limits=self.limits
        )
        if pkg.meta.round != self.round or pkg.meta.client_id != client_id:
            raise StaleOrInvalid(
                f"the Fisher package is for client {pkg.meta.client_id!r}, round {pkg.meta.round}; "
                f"its delta is client {client_id!r}'s in round {self.round}"
            )
        check_values(pkg.tensors, self.max_abs, f"Fisher of {client_id!r}")
        filled = fill_missing(pkg.tensors, self.shapes)
        return {k: (v.to_dense() if isinstance(v, SparseTensor) else v) for k, v in filled.items()}

    def _dense(
        self, content: RecordDict, client_id: str
    ) -> tuple[str, int, str, int, Mapping[str, Any], dict[str, Any]]:
        """A plain Flower reply: full weights in ``"arrays"`` (or in its only ArrayRecord)."""
        records = dict(content.array_records)
        if ARRAYS_RECORD in records:
            records = {ARRAYS_RECORD: records[ARRAYS_RECORD]}
        if len(records) != 1:
            raise StaleOrInvalid(
                f"reply carries neither a fedmerge package nor its weights in ArrayRecord "
                f"{ARRAYS_RECORD!r} (ArrayRecords: {sorted(content.array_records)})"
            )
        n = reply_num_examples(content)
        self._check_examples(n, client_id)
        key = next(iter(records))
        try:  # the reply may say which of its fp32 tensors are widened bf16 ("fedmerge.dtypes")
            dtypes_of(content.config_records.get(DTYPES_RECORD), records[key].keys())
        except DtypeRecordError as exc:
            raise StaleOrInvalid(str(exc)) from None
        delta = dense_record_to_task_vector(content, self.base_weights, key=key)
        check_values(delta, self.max_abs, f"dense reply of {client_id!r}")
        digest = hashlib.sha256()
        for name in sorted(delta):
            digest.update(name.encode())
            digest.update(delta[name].numpy().tobytes())
        wire = sum(len(a.data) for a in records[key].values())
        dtypes = sorted({_VALUE_NAMES.get(str(records[key][name].dtype), str(records[key][name].dtype))
                         for name in delta})  # fmt: skip
        codec = {"format": "dense", "values": ",".join(dtypes), "density": 1.0}
        return client_id, n, digest.hexdigest(), wire, delta, codec

    def _check_examples(self, n: int, client_id: str) -> None:
        if not 1 <= n <= self.cfg.max_num_examples:
            raise StaleOrInvalid(
                f"num-examples={n} from {client_id!r} is outside [1, max-num-examples="
                f"{self.cfg.max_num_examples}]; report the number of local training examples"
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


@dataclass(frozen=True)
class DownlinkUpdate:
    """How nodes holding ``parent`` reach the new version: a codec package and the expected digest."""

    parent_id: str
    package: bytes
    digest: str


def build_messages(
    nodes: list[int],
    cfg: RunConfig,
    round_: int,
    base: Version,
    base_weights: Mapping[str, torch.Tensor],
    holders: set[int],
    update: DownlinkUpdate | None = None,
    parent_holders: set[int] = frozenset(),  # type: ignore[assignment]
    node_settings: Callable[[int], Mapping[str, Any]] | None = None,
) -> tuple[list[Message], int]:
    """One ``train`` message per node, in Flower's shape (``"arrays"``, ``"config"``) with fedmerge's extras
    beside them (``"fedmerge.config"``). ``holders`` (fedmerge clients holding the base: see
    :meth:`Federation.run_round`) get no weights, the compressed ``update`` goes to fedmerge clients
    holding its parent, and every other node — any plain Flower client — gets the full weights in
    ``"arrays"`` — bf16 tensors widened to fp32 there and named in ``"fedmerge.dtypes"``
    (:func:`~fedmerge.flower.records.widen_for_numpy`). ``node_settings(node)`` adds per-node keys to
    ``"fedmerge.config"`` (the bulk endpoint and the node's upload token). With ``bulk-downlink = true``
    and a base larger than ``bulk-threshold-bytes``, a node that needs full weights gets instead the
    base's download reference from the bulk endpoint
    (:meth:`~fedmerge.flower.server.bulk_endpoint.NodeBulkSettings.base_reference`) and fetches them there.
    Returns (messages, downlink bytes)."""
    from fedmerge.flower.client.bulk import BASE_SIZE_KEY
    from fedmerge.flower.server.bulk_endpoint import NodeBulkSettings

    config = train_config(cfg, round_, base)
    extras = fedmerge_config(cfg, round_, base)
    weights: ArrayRecord | None = None  # built once, and only if some node needs full weights
    dtypes: ConfigRecord | None = None  # "fedmerge.dtypes": the tensors widened in "arrays"
    weight_bytes = 0
    messages, downlink = [], 0
    for node in nodes:
        settings = {} if node_settings is None else node_settings(node)
        node_extras = extras if node_settings is None else ConfigRecord({**extras, **settings})
        content = RecordDict({CONFIG_RECORD: config, FEDMERGE_RECORD: node_extras})
        needs_base = node not in holders and (update is None or node not in parent_holders)
        ref = None
        if cfg.bulk_downlink and needs_base and isinstance(settings, NodeBulkSettings):
            ref = settings.base_reference(base)  # None below bulk-threshold-bytes: "arrays" then
        if node in holders:
            pass
        elif update is not None and node in parent_holders:
            content[UPDATE_RECORD] = package_to_record(update.package)[RECORD_KEY]
            content[UPDATE_META_RECORD] = ConfigRecord(
                {"parent-version-id": update.parent_id, "digest": update.digest}
            )
            downlink += len(update.package)
        elif ref is not None:  # the node downloads the base from the bulk endpoint
            content[FEDMERGE_RECORD] = ConfigRecord({**node_extras, **ref})
            downlink += int(ref[BASE_SIZE_KEY])
        else:
            if weights is None:  # a store view is read here, once
                full, widened = widen_for_numpy(dict(base_weights.items()))  # numpy has no bf16
                weights = ArrayRecord(full)
                dtypes = ConfigRecord(dict[str, Any](widened)) if widened else None
                weight_bytes = sum(t.numel() * t.element_size() for t in full.values())
                del full
            content[ARRAYS_RECORD] = weights
            if dtypes is not None:
                content[DTYPES_RECORD] = dtypes
            downlink += weight_bytes
        messages.append(
            Message(
                content,
                dst_node_id=node,
                message_type="train",
                group_id=str(round_),
                ttl=cfg.round_deadline_s,
            )
        )
    return messages, downlink


def deadline_reason(deadline_s: float) -> str:
    """The recorded reason of a node that did not reply in time (by our clock or by the message's TTL)."""
    return f"timeout: no reply within round-deadline-s={deadline_s:g}"


def collect(
    grid: Grid, messages: list[Message], nodes: list[int], state: RoundState, deadline_s: float
) -> list[ReplyOutcome]:
    """Push, then pull replies as they arrive and judge each at once, until all came or the deadline."""
    return exchange(
        grid, messages, nodes, state.judge,
        lambda node, reason: ReplyOutcome(node, state.labels.get(node, f"node-{node}"), False, reason),
        deadline_s, deadline_reason(deadline_s),
    )  # fmt: skip


@dataclass
class Federation:
    """Runs rounds against one store; ``evaluate`` scores full weights (server-side evaluation)."""

    grid: Grid
    cfg: RunConfig
    store: ModelStore
    evaluate: Evaluator | None = None
    on_round: Callable[[RoundReport], None] | None = None
    holders: dict[str, set[int]] = field(default_factory=dict)
    updates: dict[str, DownlinkUpdate] = field(default_factory=dict)  # version id → how to reach it
    server_residual: StateDict | None = None  # what the compressed downlink has not sent yet
    latest_weights: tuple[str, StateDict] | None = None  # (version id, θ) of the last commit
    bulk: BulkEndpoint | None = None  # large payloads (bulk-address); started by run() when configured
    labels: dict[int, str] = field(default_factory=dict)  # node id → the client id its replies state
    _warm: bool = field(default=False, init=False)

    def weights_of(self, base: Version) -> StateDict:
        """θ of ``base``: kept from this server's last commit, else materialised from the store (which
        reads the whole chain of deltas, a cost that grows with the number of rounds)."""
        if self.latest_weights is not None and self.latest_weights[0] == base.id:
            return self.latest_weights[1]
        return self.store.materialize(base)

    def warm_up(self) -> None:
        """Load and compile the merge's code (the aggregator's numba kernels, serial and parallel, dense
        and sparse folds) with one tiny merge, so that a round's memory and time are its data's. Done
        once per process by :meth:`run`; a caller may do it earlier (e.g. before it measures a round)."""
        if self._warm:
            return
        sizes = {"warm-up.small": (64,), "warm-up.large": (PARALLEL_MIN_ELEMENTS,)}
        agg = create(self.cfg.aggregator, **aggregator_args(self.cfg, 0))
        agg.begin(sizes)
        gen = torch.Generator().manual_seed(0)
        for i in range(3):
            dense = {n: torch.randn(shape, generator=gen) * 1e-3 for n, shape in sizes.items()}
            delta: dict[str, Any] = dense
            if i == 2:  # a sparse client too
                delta = {n: SparseTensor.from_dense(t * (t.abs() > 2e-3)) for n, t in dense.items()}
            side: dict[str, Any] = {
                k: {n: t.abs() for n, t in dense.items()}
                for k in get_aggregator(self.cfg.aggregator).side_inputs
            }
            agg.add(delta, 1.0, client_id=f"warm-up-{i}", **side)
        agg.finalize()
        self._warm = True

    def run(self) -> list[RoundReport]:
        """``num-rounds`` rounds from the store's latest version; raises RoundAborted when one fails."""
        self.warm_up()
        first = start_round(self.store.get("latest"))
        with contextlib.ExitStack() as stack:
            if self.bulk is None and self.cfg.bulk_address:
                self.bulk = stack.enter_context(bulk_endpoint_for(self.cfg, self.store))
                stack.callback(setattr, self, "bulk", None)
            if self.bulk is not None:
                dropped = self.bulk.discard_except(first)
                if dropped:
                    log.info("discarded the spools of an earlier run: %s", dropped)
            return self._run_rounds(first)

    def evaluate_federated(self, report: RoundReport) -> EvaluationReport:
        """Send the version ``report`` committed to a sample of nodes as ``evaluate`` messages and record
        their aggregated metrics with it (:mod:`.evaluation`); bad replies are dropped."""
        version = self.store.get(str(report.version_id))
        labels = {o.node_id: o.client_id for o in report.outcomes if o.accepted}
        weights = self.weights_of(version)
        return run_evaluation(self.grid, self.cfg, self.store, report.round, version, weights, labels)

    def _run_rounds(self, first: int) -> list[RoundReport]:
        reports = []
        for round_ in range(first, first + self.cfg.num_rounds):
            for attempt in range(self.cfg.max_retries + 1):
                report = self.run_round(round_, attempt)
                reports.append(report)
                if report.version_id is not None and evaluation_due(self.cfg, round_):
                    report.evaluation = self.evaluate_federated(report)
                if self.on_round is not None:
                    self.on_round(report)
                if report.version_id is not None:
                    break
            else:
                raise RoundAborted(
                    f"round {round_}: fewer than min-valid={self.cfg.min_valid} valid replies in "
                    f"{self.cfg.max_retries + 1} attempt(s); nothing committed. Reasons: "
                    + "; ".join(f"{o.client_id}: {o.reason}" for o in reports[-1].rejected)
                )
        return reports

    def run_round(self, round_: int, attempt: int = 0) -> RoundReport:
        """One round attempt: sample, push, judge replies as they arrive, merge, commit a version.

        With a bulk endpoint and nothing that needs the whole merged delta in memory
        (:func:`~.spool_merge.spool_fold_blocker`), the base weights are a store view and
        the merge runs tensor-major from the spool (:mod:`.spool_merge`); otherwise each
        accepted reply is folded as it is judged."""
        t0 = time.perf_counter()
        base = self.store.get("latest")
        blocker = spool_fold_blocker(self.cfg, self.evaluate is not None)
        tensor_major = self.bulk is not None and blocker is None
        weights: Mapping[str, torch.Tensor] = (
            self.store.weights_view(base) if tensor_major else self.weights_of(base)
        )
        report = RoundReport(round_, attempt, base.id, [])
        nodes = wait_for_nodes(self.grid, self.cfg.min_clients, self.cfg.wait_for_nodes_s)
        if len(nodes) < self.cfg.min_valid:
            log.warning("round %d: only %d nodes connected (< min-valid)", round_, len(nodes))
            report.wall_s = time.perf_counter() - t0
            return report
        sampled = sample_nodes(nodes, self.cfg, round_, attempt)
        holders = self.holders.setdefault(base.id, set())
        update = self.updates.get(base.id)
        parent_holders = self.holders.get(update.parent_id, set()) if update else set()
        bulk = self.bulk
        if bulk is not None:
            bulk.open_round(round_, attempt)
        messages, report.downlink_bytes = build_messages(
            sampled, self.cfg, round_, base, weights, holders, update, parent_holders,
            node_settings=None if bulk is None else lambda node: bulk.settings_for(round_, attempt, node),
        )  # fmt: skip
        shapes = floating_shapes_of(weights) if isinstance(weights, TensorView) else None
        state = RoundState(self.cfg, round_, base, weights, shapes=shapes, fold=not tensor_major)
        state.reference = reference_for(self.store, base, lazy=tensor_major)
        state.labels = self.labels  # client ids stated in earlier replies name the nodes
        state.bulk, state.attempt = bulk, attempt
        try:
            report.outcomes = collect(self.grid, messages, sampled, state, self.cfg.round_deadline_s)
            # only fedmerge clients cache the base: a plain Flower client gets "arrays" in every round
            holders.update(o.node_id for o in report.outcomes if o.accepted and o.fedmerge_client)
            report.metrics = round_metrics(report)
            collected = time.perf_counter()
            if not state.fold and len(report.accepted) >= self.cfg.min_valid:
                try:
                    report.version_id = self._commit_tensor_major(base, state, report)
                except NonFiniteMerge as exc:  # find the offenders the in-memory way
                    log.warning("round %d: %s; merging in memory to find the offending replies", round_, exc)
                    state = refold(state, self.weights_of(base))
            if state.fold:
                self._merge_in_memory(state, report, base, len(sampled), len(nodes))
            elif report.version_id is None:
                log.warning(
                    "round %d attempt %d: %d valid replies < min-valid=%d; nothing committed",
                    round_, attempt, len(report.accepted), self.cfg.min_valid,
                )  # fmt: skip
            report.merge_s = time.perf_counter() - collected
        finally:
            for held in state.held:
                held.close()
        if bulk is not None:  # committed or abandoned: the spool is reclaimed either way
            bulk.close_round(round_, attempt)
        report.wall_s = time.perf_counter() - t0
        return report

    def _merge_in_memory(
        self, state: RoundState, report: RoundReport, base: Version, cohort: int, connected: int
    ) -> None:
        """Finalize the folded merge (checked finite), privatise, step the server optimiser, commit."""
        round_, attempt = report.round, report.attempt
        weights = state.base_weights
        assert isinstance(weights, dict), "the in-memory merge runs on materialised weights"
        state, finalized = finite_merge(state, report)
        if finalized is not None and len(report.accepted) >= self.cfg.min_valid:
            merged, state.privacy = privatize_round(
                finalized, self.cfg, prior_accountant(self.store, base),
                cohort=cohort, connected=connected, accepted=len(report.accepted),
                round_=round_, attempt=attempt,
            )  # fmt: skip
            opt = self.cfg.server_opt()  # a server optimiser's step; its state is kept with the version
            merged, opt_state = round_step(opt, self.store.load_state(base) if opt.enabled else None, merged)
            report.version_id = self._commit(base, merged, weights, state, report, opt_state)
        else:
            log.warning(
                "round %d attempt %d: %d valid replies < min-valid=%d; nothing committed",
                round_, attempt, len(report.accepted), self.cfg.min_valid,
            )  # fmt: skip

    def _commit_tensor_major(self, base: Version, state: RoundState, report: RoundReport) -> str:
        """Merge the held replies tensor by tensor straight into a streamed commit (spool_merge)."""
        check_latest_unmoved(self.store, base, report.round)
        version = self.store.commit_stream(
            merge_tensor_major(self.cfg, report.round, state.shapes, state.held),
            parents=[base.id],
            method=self.cfg.aggregator,
            params=self._version_params(state, {}),
            contributors=contributors_of(report),
            round=report.round,
            metrics=report.metrics,
            privacy=state.privacy,
            metadata=self._version_metadata(state, report),
        )
        self.latest_weights = None  # θ was never in memory: the next round reads it from the store
        return version.id

    def _commit(
        self,
        base: Version,
        merged: StateDict,
        weights: StateDict,
        state: RoundState,
        report: RoundReport,
        opt_state: StateDict | None = None,
    ) -> str:
        package = None
        if self.cfg.downlink_density < 1.0:  # commit what clients will rebuild; keep the rest as residual
            if self.server_residual is None:
                self.server_residual = without_optimizer_state(self.store.load_state(base))
            codec = CodecConfig(density=self.cfg.downlink_density, values=self.cfg.downlink_values)  # type: ignore[arg-type]
            meta = PackageMeta("server", report.round, base.id, base.content_hash)
            package, merged, self.server_residual = compress_update(merged, self.server_residual, codec, meta)
        if self.evaluate is not None:
            # θ + τ summed in (at least) fp32 and cast once to the base's dtype, as the store materialises
            new = dict(weights)
            for k in merged:
                t = weights[k]
                new[k] = (t.to(torch.promote_types(t.dtype, torch.float32)) + merged[k]).to(t.dtype)
            report.metrics.update({f"server-{k}": float(v) for k, v in self.evaluate(new).items()})
        check_latest_unmoved(self.store, base, report.round)
        version = self.store.commit(
            merged,
            parents=[base.id],
            method=self.cfg.aggregator,
            params=self._version_params(state, opt_state or {}),
            contributors=contributors_of(report),
            round=report.round,
            metrics=report.metrics,
            privacy=state.privacy,
            state={
                **(self.server_residual if package is not None and self.server_residual else {}),
                **(opt_state or {}),
            }
            or None,
            metadata=self._version_metadata(state, report),
        )
        new_weights = apply_weights(weights, merged)
        if package is not None:
            self.updates[version.id] = DownlinkUpdate(base.id, package, weights_digest(new_weights))
        # θ_base + τ in fp32 is what the store materialises for fp32 weights, bit for bit; other
        # dtypes are summed over the whole chain before one cast there, so they are re-read instead
        fp32 = all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
        self.latest_weights = (version.id, new_weights) if fp32 else None
        return version.id

    def _version_params(self, state: RoundState, opt_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {
            **state.aggregator.params,
            "codec": _codec_params(self.cfg),
            "mode": self.cfg.mode,
            "merge-order": "in-memory" if state.fold else "tensor-major",
            **({"server-optimizer": self.cfg.server_opt().params()} if opt_state else {}),
        }

    def _version_metadata(self, state: RoundState, report: RoundReport) -> dict[str, Any]:
        return {
            "attempt": report.attempt,
            "task": self.cfg.task,
            **client_metrics_metadata(report, self.cfg),
            **anomaly_metadata(state.scores, state.reference, self.cfg),
        }


def contributors_of(report: RoundReport) -> list[Contributor]:
    """Every judged reply of the round as a manifest contributor, sorted by client id."""
    return [o.contributor() for o in sorted(report.outcomes, key=lambda o: o.client_id)]


def floating_shapes_of(view: TensorView) -> dict[str, tuple[int, ...]]:
    """The floating tensors' shapes of a store view, from its manifest (no tensor is read)."""
    return {n: shape for n, shape in view.shapes.items() if view.dtypes[n].is_floating_point}


def refold(state: RoundState, weights: StateDict) -> RoundState:
    """A fresh in-memory state (``fold=True``, materialised ``weights``) with the accepted replies of
    ``state`` judged again into it; ``state``'s held replies are closed."""
    for held in state.held:
        held.close()
    new = RoundState(state.cfg, state.round, state.base, weights, max_abs=state.max_abs)
    new.reference, new.labels = state.reference, state.labels
    new.bulk, new.attempt = state.bulk, state.attempt
    for node, reply in state.accepted_replies:
        new.judge(node, reply)
    return new


def client_metrics_metadata(report: RoundReport, cfg: RunConfig) -> dict[str, Any]:
    """``client-metrics``: each accepted client's own finite metrics (as it reported them, e.g. a plain
    Flower client's ``train_loss``), kept whatever names other clients use. Withheld under central DP
    (per-client values are not covered by the DP release)."""
    if cfg.dp() is not None and cfg.dp_mode == "central":
        return {}
    return {"client-metrics": {o.client_id: dict(sorted(o.metrics.items())) for o in report.accepted}}


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor name (sorted) holding NaN or ±inf, or None when all are finite."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _finalize(state: RoundState) -> tuple[StateDict | None, str | None]:
    """(merged, None) when the fold is sound and finite, else (None, why)."""
    if state.tainted:
        return None, "an aggregator step failed part-way"
    try:
        merged = state.aggregator.finalize()
    except FedMergeError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    bad = first_nonfinite(merged)
    return (merged, None) if bad is None else (None, f"tensor {bad!r} of the merge is NaN or infinite")


def finite_merge(state: RoundState, report: RoundReport) -> tuple[RoundState, StateDict | None]:
    """The round's merge, checked finite before anything is committed; the offending contributions,
    not the round, are rejected.

    With fewer than ``min-valid`` accepted replies nothing is finalized: (state, None). When the fold
    is finite: (state, merged). Otherwise each accepted reply is merged alone; a reply whose solo merge
    is rejected, fails or is non-finite is an offender, recorded in ``report.outcomes`` as rejected
    (:class:`NonFiniteMerge`), and the others are folded again into a fresh state, returned with its
    merge if that is finite. If it is still not (an overflow only the combination produces), every
    reply is recorded rejected and (state, None) is returned: nothing is committed.
    """
    if len(report.accepted) < state.cfg.min_valid:
        return state, None
    merged, why = _finalize(state)
    if merged is not None:
        return state, merged
    log.warning("round %d: the merge is not usable (%s); merging each reply alone", state.round, why)

    def fresh() -> RoundState:
        new = RoundState(state.cfg, state.round, state.base, state.base_weights, max_abs=state.max_abs)
        new.reference, new.labels = state.reference, state.labels
        new.bulk, new.attempt = state.bulk, state.attempt
        return new

    offenders: dict[int, str] = {}
    for node, reply in state.accepted_replies:
        solo = fresh()
        outcome = solo.judge(node, reply)
        if not outcome.accepted:
            offenders[node] = str(outcome.reason)
            continue
        if solo.tainted:
            offenders[node] = "its fold failed"
            continue
        try:
            alone = solo.aggregator.finalize()
        except FedMergeError:
            continue  # e.g. a robust aggregator that needs several clients: not attributable alone
        bad = first_nonfinite(alone)
        if bad is not None:
            offenders[node] = f"merging it makes tensor {bad!r} NaN or infinite"
    clean = fresh()
    for node, reply in state.accepted_replies:
        if node not in offenders:
            clean.judge(node, reply)
    merged, why = _finalize(clean) if len(clean.accepted_replies) >= state.cfg.min_valid else (None, None)
    if merged is None:
        offenders.update({n: f"the round's merge is not finite ({why or 'too few finite replies'})"
                          for n, _ in state.accepted_replies if n not in offenders})  # fmt: skip
    report.outcomes = [
        replace(o, accepted=False, reason=f"NonFiniteMerge: {offenders[o.node_id]}; left out of the merge")
        if o.accepted and o.node_id in offenders
        else o
        for o in report.outcomes
    ]
    report.metrics = round_metrics(report)
    return clean, merged


def _codec_params(cfg: RunConfig) -> dict[str, Any]:
    c = cfg.codec()
    return {
        "sparsify": c.sparsify,
        "density": c.density,
        "values": c.values,
        "error_feedback": c.error_feedback,
    }


def round_metrics(report: RoundReport) -> dict[str, float]:
    """Weighted means of the accepted clients' metrics plus byte and count totals (all finite floats)."""
    acc = report.accepted
    total = sum(o.num_examples for o in acc)
    out: dict[str, float] = {
        "accepted": float(len(acc)),
        "rejected": float(len(report.rejected)),
        "uplink-bytes": float(report.uplink_bytes),
        "uplink-dense-bytes": float(report.uplink_dense_bytes),
        "downlink-bytes": float(report.downlink_bytes),
    }
    if total > 0:
        keys = set.intersection(*(set(o.metrics) for o in acc)) - {"num-examples"}
        for key in sorted(keys):
            value = sum(o.metrics[key] * o.num_examples for o in acc) / total
            if math.isfinite(value):
                out[f"clients-{key}"] = value
    return out


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})
