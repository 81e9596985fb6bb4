"""Client-side helpers and the client library: the base-weights cache and the error-feedback residual
in ``context.state``, and the encoding of a reply.

**For your own ClientApp** (docs/flower.md, "Writing your own ClientApp"; ``examples/hf_lora``)::

    from fedmerge.flower.client import base_weights, fedmerge_reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model.load_state_dict(base_weights(msg, context))      # the round's base (cached per node)
        ...  # fine-tune ``model`` (or a peft model wrapping it) on local data
        return fedmerge_reply(msg, context, model, num_examples=n, metrics={"train-loss": loss})

:func:`fedmerge_reply` computes τ = θ_trained − θ_base (for a peft model: the merged ΔW = (α/r)·B·A),
encodes it with the codec the server asked for (``fedmerge.config``), keeps the error-feedback
residual in ``context.state`` and returns the reply. This module imports no server-side code.

``context.state`` (a RecordDict) persists per node across the rounds of a run, and travels with every
message, so it holds only identifiers: the base's version id, content hash and weights digest in the
ConfigRecord ``fedmerge.base-meta``. The weights are packed (:mod:`fedmerge.flower.client.node_state`:
no per-tensor ``.npy`` headers) in the node-local directory by digest (``NodeFiles``; a base too large
for it stays packed in the ArrayRecord ``fedmerge.base``); the process keeps the versions it rebuilt
in a small cache keyed by digest, so the nodes it runs decode and verify each downlink update once.
The server leaves the weights out of ``"arrays"`` only for nodes whose previous reply was a fedmerge
package and that hold this version, so a node that lost them fails with :class:`MissingBase` (recorded
by the server as a failed reply; it is sent the weights next time).
The residual e_t of error feedback (c = δ + e_t is encoded, e_{t+1} = c − ĉ) is packed the same way
in the node-local directory, named by its sha256 in the ConfigRecord ``fedmerge.residual``; a residual
that is gone restarts at zero, and the reply's metrics say ``ef-residual-lost = 1``.

DP (user-level DP-FedAvg, docs/privacy.md): the server puts ``dp-*`` keys in the train message's
config; :func:`resolve_base` keeps them in the ConfigRecord ``fedmerge.dp`` of ``context.state`` and
:func:`encode_reply` clips the task vector to ``dp-clip-norm`` *before* the residual is added and
the codec sparsifies (so the residual is of the clipped delta); in ``local`` mode it then adds
N(0, (z·C)²) from a generator that is secret (``dp-noise-seed = -1``) or seeded by (seed, round, client).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmerge.codec import CodecConfig, EncodeResult, PackageMeta, encode_package
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import FedMergeError
from fedmerge.flower.client.bulk import (
    REF_SHA_KEY,
    REF_SIZE_KEY,
    BaseReference,
    BulkDownloadFailed,
    BulkTarget,
    BulkUploadFailed,
    NodeTls,
    download_base,
    upload_package,
)
from fedmerge.flower.client.local_base import BASE_DIGEST_KEY, MissingBase, own_copy, verified_base_file
from fedmerge.flower.client.node_state import (
    BASES,
    NodeStateError,
    node_files,
    pack_tensors,
    packed_record,
    record_bytes,
    unpack_tensors,
)
from fedmerge.flower.downlink import applied_update, changed_tensors, check_update_digest, weights_digest
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    FEDMERGE_RECORD,
    METRICS_RECORD,
    UPDATE_META_RECORD,
    UPDATE_RECORD,
)
from fedmerge.flower.settings import Mode
from fedmerge.flower.tls import TlsMaterialError
from fedmerge.flower.transport import FISHER_RECORD_KEY, RECORD_KEY, package_to_record, record_to_package
from fedmerge.privacy.config import DPConfig
from fedmerge.privacy.mechanism import privatize_client_delta
from fedmerge.seeds import labelled_seed

logger = logging.getLogger(__name__)

BASE_STATE = "fedmerge.base"  # context.state: the held base weights, when not in the node-local directory
BASE_META = "fedmerge.base-meta"
# how a diagonal Fisher is encoded: every entry, bf16 (fp32's exponent range), no error feedback
FISHER_CODEC = CodecConfig(sparsify="none", values="bf16", error_feedback=False)
RESIDUAL_RECORD = "fedmerge.residual"  # context.state: the residual's sha256 (or, packed, the residual)
RESIDUAL_LOST_METRIC = "ef-residual-lost"  # 1.0 in a reply whose error feedback restarted at zero
DP_RECORD = "fedmerge.dp"
BULK_RECORD = "fedmerge.bulk"  # context.state: this round's bulk endpoint and upload token
DP_KEYS = ("dp-clip-norm", "dp-noise-multiplier", "dp-delta", "dp-mode", "dp-noise-seed")


def config_record(records: RecordDict, key: str) -> ConfigRecord | None:
    """``records[key]`` when it is a ConfigRecord, else None (``RecordDict.config_records`` without
    building the filtered view of every record)."""
    value = records.get(key)
    return value if isinstance(value, ConfigRecord) else None


def array_record(records: RecordDict, key: str) -> ArrayRecord | None:
    """``records[key]`` when it is an ArrayRecord, else None."""
    value = records.get(key)
    return value if isinstance(value, ArrayRecord) else None


_CODEC_DEFAULTS: dict[str, Any] = {
    "codec-sparsify": "topk", "codec-density": 0.1, "codec-values": "int8", "codec-error-feedback": True,
}  # fmt: skip


def message_codec(conf: Mapping[str, Any], get: Callable[[str], Any] | None = None) -> CodecConfig:
    """The uplink codec a server names in ``"fedmerge.config"``: the ``codec-*`` keys as a
    :class:`CodecConfig`. ``get`` reads the four core keys (default: :data:`_CODEC_DEFAULTS` where
    absent); ``codec-rank`` and ``codec-deflate`` are optional (0, off: an older server's message)."""
    core = get or (lambda key: conf.get(key, _CODEC_DEFAULTS[key]))
    return CodecConfig(
        sparsify=core("codec-sparsify"),
        density=float(core("codec-density")),
        values=core("codec-values"),
        error_feedback=bool(core("codec-error-feedback")),
        rank=int(conf.get("codec-rank", 0)),
        deflate=bool(conf.get("codec-deflate", False)),
    )


@dataclass(frozen=True)
class TrainInstructions:
    """The settings of a ``train`` message (``"config"`` and ``"fedmerge.config"`` together), typed
    (see ``fedmerge.flower.server.federation.train_config``)."""

    round: int
    base_version_id: str
    base_version_hash: str
    task: str
    mode: Mode
    seed: int
    partitioner: str
    dirichlet_alpha: float
    local_epochs: int
    lr: float
    batch_size: int
    lora_rank: int
    lora_alpha: float
    device: str
    codec: CodecConfig
    fisher_examples: int = 0  # > 0: the aggregator needs the client's diagonal Fisher on this many examples
    test_metrics: bool = True  # evaluate on the node's test split before and after training

    @staticmethod
    def from_content(content: RecordDict) -> TrainInstructions:
        """From a message's ``"config"`` and ``"fedmerge.config"`` records (FedMergeError if absent)."""
        return TrainInstructions.from_record(message_settings(content))

    @staticmethod
    def from_record(conf: Mapping[str, Any]) -> TrainInstructions:
        def get(key: str) -> Any:
            if key not in conf:
                raise FedMergeError(
                    f"train message lacks config key {key!r}; server and client versions differ"
                )
            return conf[key]

        return TrainInstructions(
            round=int(get("round")),
            base_version_id=str(get("base-version-id")),
            base_version_hash=str(get("base-version-hash")),
            task=str(get("task")),
            mode=_mode(get("mode")),
            seed=int(get("seed")),
            partitioner=str(get("partitioner")),
            dirichlet_alpha=float(get("dirichlet-alpha")),
            local_epochs=int(get("local-epochs")),
            lr=float(get("lr")),
            batch_size=int(get("batch-size")),
            lora_rank=int(get("lora-rank")),
            lora_alpha=float(get("lora-alpha")),
            device=str(conf.get("device", "auto")),
            codec=message_codec(conf, get),
            fisher_examples=int(conf.get("fisher-examples", 0)),
            test_metrics=bool(conf.get("client-test-metrics", True)),
        )


def message_settings(content: RecordDict) -> dict[str, Any]:
    """Flower's ``"config"`` record of a train message updated with fedmerge's ``"fedmerge.config"``
    extras; a FedMergeError when the message has neither (not sent by a fedmerge ServerApp)."""
    records = {k: r for k in (CONFIG_RECORD, FEDMERGE_RECORD) if (r := config_record(content, k)) is not None}
    if not records:
        raise FedMergeError(
            f"train message has no {CONFIG_RECORD!r} or {FEDMERGE_RECORD!r} ConfigRecord "
            f"(has {sorted(content.config_records)}); was it sent by a fedmerge ServerApp?"
        )
    merged: dict[str, Any] = {}
    for record in records.values():
        merged.update(record)
    return merged


def _mode(value: Any) -> Mode:
    if value == "full":
        return "full"
    if value == "lora":
        return "lora"
    raise FedMergeError(f"train message has mode {value!r}; expected 'full' or 'lora'")


def training_device(requested: str) -> torch.device:
    """The device this node trains on: ``auto`` is ``cuda`` when the node sees a GPU (in simulation,
    when its virtual client was given a GPU fraction), else ``cpu``; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise FedMergeError(
            "client-device='cuda' but this node sees no GPU (in simulation, give clients a GPU fraction: "
            "client-resources-num-gpus > 0)"
        )
    if requested not in ("cpu", "cuda"):
        raise FedMergeError(f"train message asks for device {requested!r}; expected auto, cpu or cuda")
    return torch.device(requested)


def resolve_base(
    content: RecordDict,
    context: Context,
    version_id: str,
    version_hash: str,
    settings: Mapping[str, Any] | None = None,
    build: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> StateDict:
    """The base weights for ``version_id``: from the message's ``"arrays"`` or compressed update, or
    downloaded from the bulk endpoint the message names (:func:`fetch_base`), or the node's own copy
    when the message names the base by weights digest (``downlink-base-at-nodes``:
    :func:`take_own_base`; ``build`` makes one, e.g. a task's pretrained base), and then cached; or
    from the cache. ``settings``: the message's :func:`message_settings` when the caller has them.

    The node keeps the base packed in ``context.state`` (:mod:`fedmerge.flower.client.node_state`) with
    its version id, version hash and weights digest in ``fedmerge.base-meta``; the process's
    :data:`~fedmerge.flower.client.node_state.BASES` spares decoding it again (the caller gets its own
    copy of the tensors)."""
    state = context.state
    settings = message_settings(content) if settings is None else settings
    keep_dp_settings(content, context)
    keep_bulk_settings(content, context, settings)
    held_meta = config_record(state, BASE_META)
    # already rebuilt for this message (base_weights, then fedmerge_reply): the update is not reapplied
    holds = held_meta is not None and held_meta.get("version-hash") == version_hash
    full = array_record(content, ARRAYS_RECORD)
    if full is not None:
        if not holds:
            keep_base(context, dict(full.to_torch_state_dict()), version_id, version_hash)
    elif array_record(content, UPDATE_RECORD) is not None:
        if not holds:
            apply_downlink_update(content, context, version_id, version_hash)
    else:
        ref = BaseReference.from_settings(settings)
        if ref is not None and not holds:
            fetch_base(ref, context, version_id, version_hash)
        elif not holds and settings.get(BASE_DIGEST_KEY):
            take_own_base(context, str(settings[BASE_DIGEST_KEY]), version_id, version_hash, build)
    meta = config_record(state, BASE_META)
    if meta is None or meta.get("version-hash") != version_hash:
        held = None if meta is None else meta.get("version-id")
        raise MissingBase(
            f"this node holds base {held!r}, not {version_id!r}; the server must send its weights "
            "(it does on the next round)"
        )
    tensors, shared = held_base(context)
    return {k: v.clone() for k, v in tensors.items()} if shared else tensors


def keep_base(
    context: Context,
    weights: Mapping[str, torch.Tensor],
    version_id: str,
    version_hash: str,
    digest: str | None = None,
    packed: bytes | None = None,
) -> None:
    """Hold ``weights`` as this node's base ``version_id``: packed in the node-local directory
    (:class:`~fedmerge.flower.client.node_state.NodeFiles`, by digest) and in the process's base
    cache, with its version id, hash and digest in ``context.state``; a base the directory does not
    take (over its size limit, or not writable) is kept packed in ``context.state`` instead.
    ``digest``/``packed``: already computed."""
    tensors = {k: v.contiguous() for k, v in weights.items()}
    digest = weights_digest(tensors) if digest is None else digest
    packed = pack_tensors(tensors) if packed is None else packed
    BASES.put(digest, tensors, packed)
    if node_files(context.node_config).write_base(digest, packed):
        context.state.pop(BASE_STATE, None)  # context.state carries only the identifiers
    else:
        context.state[BASE_STATE] = packed_record(packed)
    context.state[BASE_META] = ConfigRecord(
        {"version-id": version_id, "version-hash": version_hash, "digest": digest}
    )


def held_base(context: Context) -> tuple[StateDict, bool]:
    """(the base tensors this node holds, whether they are shared): the process's cache's (not to be
    modified) when it has the digest in ``fedmerge.base-meta``, else unpacked from ``context.state``
    or read from the node-local directory, whose bytes must have that digest (the caller's own).
    :class:`MissingBase` when none of them holds it (e.g. the node runs in another process on
    another host): the server then sends the full weights, the node never trains on another base."""
    meta = config_record(context.state, BASE_META)
    if meta is None:
        raise MissingBase("this node holds no base weights; the server must send them")
    digest = str(meta.get("digest", ""))
    cached = BASES.get(digest) if digest else None
    if cached is not None:
        return cached[0], True
    record = array_record(context.state, BASE_STATE)
    if record is not None:
        packed = record_bytes(record)
        tensors = unpack_tensors(packed)
        return tensors, bool(digest) and BASES.put(digest, tensors, packed)
    files = node_files(context.node_config)
    from_files = verified_base_file(files, digest) if digest else None
    if from_files is not None:
        return from_files[0], BASES.put(digest, *from_files)
    raise MissingBase(
        f"this node's base {meta.get('version-id')!r} (digest {digest[:12]}…) is neither in this "
        f"process nor in its node-local directory {files.root}; the server must send its weights"
    )


def take_own_base(
    context: Context,
    digest: str,
    version_id: str,
    version_hash: str,
    build: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Hold the node's own copy of base ``version_id``, whose weights digest the server named
    (:func:`~fedmerge.flower.client.local_base.own_copy`: :class:`MissingBase` when it has none)."""
    found = own_copy(digest, version_id, context.node_config, build)
    keep_base(context, found.tensors, version_id, version_hash, digest=digest, packed=found.packed)


def fetch_base(ref: BaseReference, context: Context, version_id: str, version_hash: str) -> None:
    """Download the base the train message names from the bulk endpoint (streamed into a temporary
    safetensors file: memory one chunk while it arrives), check it and keep it in ``context.state``
    as if it had come in ``"arrays"``. Raises :class:`~fedmerge.flower.client.bulk.BulkDownloadFailed`
    when the reference is not this round's base, the endpoint refuses or cuts the stream, or the
    weights' :func:`~fedmerge.flower.downlink.weights_digest` is not the one announced."""
    if ref.version_id != version_id or ref.version_hash != version_hash:
        raise BulkDownloadFailed(
            f"train message asks to train on {version_id!r} but names {ref.version_id!r} for download; "
            "it was not built by a matching fedmerge ServerApp"
        )
    record = config_record(context.state, BULK_RECORD)
    target = None if record is None else BulkTarget.from_settings(record)
    if target is None:
        raise BulkDownloadFailed(
            f"train message names base {version_id!r} for download but no bulk endpoint and token"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="fedmerge-base-") as tmp:
        path = download_base(ref, target, Path(tmp) / "base.safetensors", node=bulk_node_tls(context))
        try:
            weights = load_file(path)
        except SafetensorError as exc:
            raise BulkDownloadFailed(
                f"downloaded base {version_id!r} is not a safetensors file: {exc}"
            ) from None
    digest = weights_digest(weights)
    if digest != ref.digest:
        raise BulkDownloadFailed(
            f"downloaded base {version_id!r} has weights digest {digest[:12]}…, the server announced "
            f"{ref.digest[:12]}…: corrupted in transit or a wrong server; it is not used"
        )
    keep_base(context, weights, version_id, version_hash, digest=digest)


def apply_downlink_update(content: RecordDict, context: Context, version_id: str, version_hash: str) -> None:
    """Rebuild ``version_id`` from the held parent and the compressed update (bit for bit, verified).

    When this process already applied the same package (by sha256) to a parent of the same digest,
    the verified result is taken from :data:`~fedmerge.flower.client.node_state.BASES`; a result whose
    digest is not the server's raises :class:`~fedmerge.flower.downlink.UpdateMismatch` either way."""
    state = context.state
    info = content.config_records[UPDATE_META_RECORD]
    meta = config_record(state, BASE_META)
    parent = str(info["parent-version-id"])
    if meta is None or meta.get("version-id") != parent:
        held = None if meta is None else meta.get("version-id")
        raise MissingBase(f"got an update from {parent!r} but this node holds {held!r}; send full weights")
    package = record_to_package(RecordDict({RECORD_KEY: content.array_records[UPDATE_RECORD]}))
    expected = str(info["digest"])
    parent_digest = str(meta.get("digest", ""))
    package_sha = hashlib.sha256(package).hexdigest()
    known = BASES.applied(parent_digest, package_sha) if parent_digest else None
    if known is not None:
        cached = BASES.get(known)
        if cached is not None:
            check_update_digest(known, expected)
            keep_base(context, cached[0], version_id, version_hash, digest=known, packed=cached[1])
            return
    weights = applied_update(held_base(context)[0], package)
    digest = weights_digest(weights)
    packed = pack_tensors(weights)
    if parent_digest and BASES.put(digest, weights, packed):
        BASES.record_applied(parent_digest, package_sha, digest)
    check_update_digest(digest, expected)
    keep_base(context, weights, version_id, version_hash, digest=digest, packed=packed)


def keep_dp_settings(content: RecordDict, context: Context) -> None:
    """Store this message's ``dp-*`` settings in ``context.state`` (removed when the message has none)."""
    values: dict[str, Any] = {}
    for key in (CONFIG_RECORD, FEDMERGE_RECORD):
        conf = config_record(content, key)
        values.update({k: conf[k] for k in DP_KEYS if conf is not None and k in conf})
    if values.get("dp-clip-norm", 0.0):
        context.state[DP_RECORD] = ConfigRecord(values)
    elif config_record(context.state, DP_RECORD) is not None:
        del context.state[DP_RECORD]


def keep_bulk_settings(
    content: RecordDict, context: Context, settings: Mapping[str, Any] | None = None
) -> None:
    """Keep this message's bulk endpoint and upload token in ``context.state`` (removed when the
    message offers none, so a token is never used for another round). ``settings``: the message's
    :func:`message_settings` when the caller has them already."""
    if settings is None:
        has_settings = any(config_record(content, k) is not None for k in (CONFIG_RECORD, FEDMERGE_RECORD))
        settings = message_settings(content) if has_settings else {}
    target = BulkTarget.from_settings(settings)
    if target is not None:
        context.state[BULK_RECORD] = ConfigRecord(target.to_record())
    elif config_record(context.state, BULK_RECORD) is not None:
        del context.state[BULK_RECORD]


def bulk_node_tls(context: Context) -> NodeTls:
    """This node's TLS settings for the bulk endpoint, from its node config (a
    :class:`~fedmerge.flower.client.bulk.BulkUploadFailed` naming the key when one is malformed)."""
    try:
        return NodeTls.from_node_config(context.node_config)
    except TlsMaterialError as exc:
        raise BulkUploadFailed(f"bulk upload not attempted: {exc}") from None


def client_dp(context: Context) -> tuple[DPConfig, int] | None:
    """(DPConfig, noise seed) of the round this node is training for, or None when DP is off."""
    rec = config_record(context.state, DP_RECORD)
    if rec is None:
        return None
    dp = DPConfig(
        clip_norm=float(rec["dp-clip-norm"]),  # type: ignore[arg-type]
        noise_multiplier=float(rec.get("dp-noise-multiplier", 0.0)),  # type: ignore[arg-type]
        delta=float(rec.get("dp-delta", 1e-5)),  # type: ignore[arg-type]
        mode=str(rec.get("dp-mode", "central")),
    )
    return dp, int(rec.get("dp-noise-seed", -1))  # type: ignore[arg-type]


def local_noise_generator(noise_seed: int, round_: int, client_id: str) -> torch.Generator:
    """Secret (``noise_seed = -1``: from the OS) or reproducible from (noise_seed, round, client)."""
    if noise_seed < 0:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return torch.Generator().manual_seed(labelled_seed("dp-local", noise_seed, round_, client_id))


def residual_state(context: Context) -> tuple[dict[str, torch.Tensor] | None, bool]:
    """(this node's error-feedback residual or None, whether it was lost). ``context.state`` names the
    residual by the sha256 of its packed bytes in the node-local directory (or holds it packed, when
    the directory did not take it). None and not lost before the node's first reply; None and lost
    when the named file is missing or holds other bytes (the node runs in another process on another
    host, or the directory was cleared): error feedback then restarts at zero, never from another
    node's or another run's residual."""
    value = context.state.get(RESIDUAL_RECORD)
    if isinstance(value, ArrayRecord):
        return unpack_tensors(record_bytes(value)), False
    if not isinstance(value, ConfigRecord):
        return None, False
    sha = str(value.get("sha256", ""))
    data = node_files(context.node_config).read_residual(context.run_id, context.node_id, sha)
    if data is not None:
        try:
            return unpack_tensors(data), False
        except NodeStateError:
            pass
    logger.warning(
        "node %s: its error-feedback residual (sha256 %s…) is not in the node-local directory; "
        "error feedback restarts at zero (metric %s = 1)",
        context.node_id, sha[:12], RESIDUAL_LOST_METRIC,
    )  # fmt: skip
    return None, True


def load_residual(context: Context) -> dict[str, torch.Tensor] | None:
    """This node's error-feedback residual, or None before its first reply (or when it was lost:
    :func:`residual_state`)."""
    return residual_state(context)[0]


def save_residual(context: Context, residual: Mapping[str, torch.Tensor]) -> None:
    """Keep the residual in the node-local directory and its sha256 in ``context.state`` (packed in
    ``context.state`` itself when the directory does not take it). An empty residual changes nothing."""
    if not residual:
        return
    packed = pack_tensors(residual)
    files = node_files(context.node_config)
    held = context.state.get(RESIDUAL_RECORD)
    current = str(held.get("sha256", "")) if isinstance(held, ConfigRecord) else ""
    before = str(held.get("previous", "")) if isinstance(held, ConfigRecord) else ""
    if len(packed) <= files.max_residual_bytes:
        try:
            sha = files.write_residual(context.run_id, context.node_id, packed, keep=current, drop=before)
        except OSError:
            pass
        else:
            context.state[RESIDUAL_RECORD] = ConfigRecord({"sha256": sha, "previous": current})
            return
    context.state[RESIDUAL_RECORD] = packed_record(packed)


def encode_reply(
    delta: Mapping[str, torch.Tensor],
    codec: CodecConfig,
    meta: PackageMeta,
    context: Context,
    metrics: Mapping[str, float],
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> tuple[RecordDict, EncodeResult]:
    """Encode ``delta`` with the node's residual, keep the new residual, and build the reply content.

    ``fisher`` (when the round's aggregator asks for it: ``TrainInstructions.fisher_examples`` > 0)
    travels beside the delta as a second package in ArrayRecord ``"fedmerge.fisher"``, dense bf16
    (:data:`FISHER_CODEC`: fp32's range, so small squared gradients are not flushed to zero), inline
    even when the delta goes through the bulk endpoint.

    A package larger than the server's ``bulk-threshold-bytes`` (when the train message offered a
    bulk endpoint) is uploaded there (:func:`fedmerge.flower.client.bulk.upload_package`) and the
    reply's ``"config"`` carries its sha256 and size instead of the package. When the endpoint speaks
    TLS, the node's CA bundle and client certificate come from its node config
    (``bulk-root-certificates``, ``bulk-client-cert``, ``bulk-client-key``:
    :class:`~fedmerge.flower.client.bulk.NodeTls`); a failed upload raises
    :class:`~fedmerge.flower.client.bulk.BulkUploadFailed`, whose reason the server records.

    Under DP (:func:`client_dp`) the delta is clipped (and in local mode noised) first, and the
    metrics report ``dp-norm`` (‖τ‖ before clipping) and ``dp-clip-factor`` (min(1, C/‖τ‖)).
    """
    settings = client_dp(context)
    if settings is not None:
        dp, noise_seed = settings
        gen = local_noise_generator(noise_seed, meta.round, meta.client_id)
        delta, norm = privatize_client_delta(delta, dp, gen)
        factor = 1.0 if norm <= dp.clip_norm else dp.clip_norm / norm
        metrics = {**metrics, "dp-norm": norm, "dp-clip-factor": factor}
    residual, lost = residual_state(context) if codec.error_feedback else (None, False)
    if lost:
        metrics = {**metrics, RESIDUAL_LOST_METRIC: 1.0}
    # tensors that did not change (and owe no residual) are left out: zero change (a LoRA round's
    # untouched weights cost nothing)
    delta, residual = changed_tensors(delta, residual)
    result = encode_package(delta, codec, meta=meta, residual=residual)
    if codec.error_feedback:
        save_residual(context, result.residual)
    record = config_record(context.state, BULK_RECORD)
    target = None if record is None else BulkTarget.from_settings(record)
    if target is not None and len(result.data) > target.threshold_bytes:
        # above the threshold the package goes through the bulk endpoint; the reply names it
        sha = upload_package(result.data, target, node=bulk_node_tls(context))
        ref = ConfigRecord({REF_SHA_KEY: sha, REF_SIZE_KEY: len(result.data)})
        content = RecordDict({CONFIG_RECORD: ref})
    else:
        content = package_to_record(result.data)
    if fisher is not None:
        fisher_data = encode_package(fisher, FISHER_CODEC, meta=meta).data
        content[FISHER_RECORD_KEY] = package_to_record(fisher_data, FISHER_RECORD_KEY)[FISHER_RECORD_KEY]
    content[METRICS_RECORD] = MetricRecord(
        {
            **{k: float(v) for k, v in metrics.items()},
            "num-examples": meta.num_examples,
            "package-bytes": len(result.data),
        }
    )
    return content, result


# ------------------------------------------------------------------------------ the client library


def _base_ids(content: RecordDict) -> tuple[int, str, str]:
    """(round, base version id, base version hash) of a fedmerge ``train`` message."""
    conf = message_settings(content)
    missing = [k for k in ("round", "base-version-id", "base-version-hash") if k not in conf]
    if missing:
        raise FedMergeError(
            f"train message lacks {missing} in {FEDMERGE_RECORD!r}; it was not sent by a fedmerge "
            "ServerApp, or server and client versions differ"
        )
    return int(conf["round"]), str(conf["base-version-id"]), str(conf["base-version-hash"])


def base_weights(message: Message, context: Context) -> StateDict:
    """The weights of the base version this ``train`` message asks the node to fine-tune.

    Taken from the message's ``"arrays"`` (and cached in ``context.state``), rebuilt from the held
    parent and a compressed update, downloaded from the bulk endpoint when the message names the base
    for download (``bulk-downlink``: :func:`fetch_base`, which raises
    :class:`~fedmerge.flower.client.bulk.BulkDownloadFailed` when that fails), or read from the cache
    when the server knows this node holds them.
    Raises :class:`MissingBase` when the node holds another version (the server then sends the weights
    in the next round) and FedMergeError when the message was not sent by a fedmerge ServerApp.
    """
    _, version_id, version_hash = _base_ids(message.content)
    return resolve_base(message.content, context, version_id, version_hash)


def client_id_of(context: Context, default: str | None = None) -> str:
    """The node's ``client-id`` (``--node-config "client-id='inst-a'"``), else ``default`` or
    ``node-<id>``: the label recorded in each version's contributors."""
    value = context.node_config.get("client-id")
    return str(value) if value is not None else (default or f"node-{context.node_id}")


def trained_weights(model: Any) -> StateDict:
    """A CPU state dict of ``model``: a ``torch.nn.Module``, a state dict, or a peft ``PeftModel`` (a
    copy with its adapters merged: W + (α/r)·B·A; the caller's model is left untouched)."""
    if isinstance(model, Mapping):
        return {str(k): v.detach().cpu() for k, v in model.items()}
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    if not isinstance(model, torch.nn.Module):
        raise FedMergeError(
            f"cannot take weights from a {type(model).__name__}; pass a torch.nn.Module, a peft model "
            "or a state dict"
        )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def fedmerge_reply(
    message: Message,
    context: Context,
    model: Any,
    *,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    client_id: str | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> Message:
    """The reply to a fedmerge ``train`` message: the compressed task vector of ``model``.

    ``model`` is the fine-tuned model (``nn.Module``, state dict, or peft model, see
    :func:`trained_weights`); τ = θ_model − θ_base over the base's floating tensors (the base is the one
    :func:`base_weights` returned for this message, read from ``context.state``). τ is encoded with the
    codec of the message's ``fedmerge.config`` (top-k density, value quantisation) plus this node's
    error-feedback residual, which is updated in ``context.state``; DP clipping / local noise apply
    when the server asks for them. ``metrics`` (finite floats, e.g. ``train-loss``) travel in the
    reply's ``"metrics"`` with ``num-examples`` (the aggregation weight, ≥ 1). When the message's
    ``fisher-examples`` is > 0 the round's aggregator merges with each client's diagonal Fisher: pass
    it as ``fisher`` (names of the base's floating tensors;
    :func:`fedmerge.delta.fisher.diagonal_fisher` computes one from any per-example loss).
    """
    round_, version_id, version_hash = _base_ids(message.content)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise FedMergeError(f"num_examples={num_examples!r} must be an int ≥ 1 (local training examples)")
    base = resolve_base(message.content, context, version_id, version_hash)
    trained = trained_weights(model)
    missing = [n for n, t in base.items() if t.is_floating_point() and n not in trained]
    if missing:
        raise FedMergeError(
            f"the trained model lacks {len(missing)} base tensor(s), e.g. {missing[0]!r}; pass the model "
            "whose state dict has the base's names (a peft model is merged first)"
        )
    delta = {
        n: trained[n].to(torch.float32) - t.to(torch.float32)
        for n, t in base.items()
        if t.is_floating_point()
    }
    conf = message_settings(message.content)
    codec = message_codec(conf)
    meta = PackageMeta(
        client_id=client_id or client_id_of(context),
        round=round_,
        base_version_id=version_id,
        base_version_hash=version_hash,
        num_examples=num_examples,
    )
    content, _ = encode_reply(delta, codec, meta, context, dict(metrics or {}), fisher)
    return Message(content, reply_to=message)
