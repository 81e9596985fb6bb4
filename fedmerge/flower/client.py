"""Client-side helpers: the base-weights cache and the error-feedback residual in ``context.state``,
and the encoding of a reply.

``context.state`` (a RecordDict) persists per node across the rounds of a run. The base weights live
in the ArrayRecord ``fedmerge.base`` with the version id and content hash beside them in the
ConfigRecord ``fedmerge.base-meta``; the server sends weights only to nodes it has not served this
version, so a node that lacks them fails with :class:`MissingBase` (recorded by the server as a
failed reply). The residual e_t of error feedback (c = δ + e_t is encoded, e_{t+1} = c − ĉ) lives in
the ArrayRecord ``fedmerge.residual``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedmerge.codec import CodecConfig, EncodeResult, PackageMeta, encode_package
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import FedMergeError
from fedmerge.flower.config import Mode
from fedmerge.flower.rounds import BASE_RECORD, METRICS_RECORD
from fedmerge.flower.transport import package_to_record

BASE_META = "fedmerge.base-meta"
RESIDUAL_RECORD = "fedmerge.residual"


@dataclass(frozen=True)
class TrainInstructions:
    """The ``fedmerge.config`` ConfigRecord of a ``train`` message, typed (see ``rounds.train_config``)."""

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
    codec: CodecConfig

    @staticmethod
    def from_record(conf: ConfigRecord) -> TrainInstructions:
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
            codec=CodecConfig(
                sparsify=get("codec-sparsify"),
                density=float(get("codec-density")),
                values=get("codec-values"),
                error_feedback=bool(get("codec-error-feedback")),
            ),
        )


def _mode(value: Any) -> Mode:
    if value == "full":
        return "full"
    if value == "lora":
        return "lora"
    raise FedMergeError(f"train message has mode {value!r}; expected 'full' or 'lora'")


class MissingBase(FedMergeError, RuntimeError):
    """The node was asked to train on a base version whose weights it does not hold."""


def resolve_base(content: RecordDict, context: Context, version_id: str, version_hash: str) -> StateDict:
    """The base weights for ``version_id``: from the message (and then cached) or from the cache."""
    state = context.state
    if BASE_RECORD in content.array_records:
        state[BASE_RECORD] = content.array_records[BASE_RECORD]
        state[BASE_META] = ConfigRecord({"version-id": version_id, "version-hash": version_hash})
    meta = state.config_records.get(BASE_META)
    if meta is None or meta.get("version-hash") != version_hash:
        held = None if meta is None else meta.get("version-id")
        raise MissingBase(
            f"this node holds base {held!r}, not {version_id!r}; the server must send its weights "
            "(it does on the next round)"
        )
    return dict(state.array_records[BASE_RECORD].to_torch_state_dict())


def load_residual(context: Context) -> dict[str, torch.Tensor] | None:
    record = context.state.array_records.get(RESIDUAL_RECORD)
    return None if record is None else dict(record.to_torch_state_dict())


def save_residual(context: Context, residual: Mapping[str, torch.Tensor]) -> None:
    if residual:
        context.state[RESIDUAL_RECORD] = ArrayRecord({k: v.contiguous() for k, v in residual.items()})


def encode_reply(
    delta: Mapping[str, torch.Tensor],
    codec: CodecConfig,
    meta: PackageMeta,
    context: Context,
    metrics: Mapping[str, float],
) -> tuple[RecordDict, EncodeResult]:
    """Encode ``delta`` with the node's residual, keep the new residual, and build the reply content."""
    residual = load_residual(context) if codec.error_feedback else None
    result = encode_package(delta, codec, meta=meta, residual=residual)
    if codec.error_feedback:
        save_residual(context, result.residual)
    content = package_to_record(result.data)
    content[METRICS_RECORD] = MetricRecord(
        {
            **{k: float(v) for k, v in metrics.items()},
            "num-examples": meta.num_examples,
            "package-bytes": len(result.data),
        }
    )
    return content, result
