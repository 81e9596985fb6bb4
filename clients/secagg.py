"""Client side of SecAgg+ rounds: train on the node's partition, submit the terms of
:func:`fedmerge.privacy.secagg.submission_terms` (masked by Flower's ``secaggplus_mod``) or, in the plain
reference rounds, the dense fp32 task vector."""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    NDArrays,
    Scalar,
)

from fedmerge.privacy.secagg import SecAggConfig, check_range, submission_terms
from fedmerge.tasks import get_task
from fedmerge.tasks.local_round import local_round
from fedmerge.tasks.training import seed_from, torch_threads

log = logging.getLogger("fedmerge.secagg")


class SecAggClient(NumPyClient):
    """Trains on its partition and returns the submission terms (secure) or the dense fp32 task vector."""

    def __init__(self, context: Context) -> None:
        self._context = context

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from fedmerge.tasks.partitions import node_partition, partition_for

        round_ = int(cast(int, config["round"]))
        names = str(config["names"]).split(",")
        cfg = SecAggConfig.from_mapping({k: v for k, v in config.items() if k not in ("round", "names")})
        pid, num = node_partition(self._context)
        task = get_task(cfg.task)
        data = partition_for(cfg.task, num, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)[pid]
        base = {
            n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in zip(names, parameters, strict=True)
        }
        with torch_threads(1):
            update = local_round(
                task, base, data, seed=cfg.seed, round_=round_, epochs=cfg.local_epochs, lr=cfg.lr,
                batch_size=cfg.batch_size,
            )  # fmt: skip
        metrics: dict[str, Scalar] = {"partition-id": pid}
        if not cfg.secure:
            dense = [update.delta[n].float().numpy() for n in names]
            return dense, data.num_examples, metrics
        terms = submission_terms(update.delta, names, data.num_examples, cfg, round_=round_, client=pid)
        check_range(terms, cfg.clipping_range)
        # Flower's stochastic rounding draws from numpy's global RNG: seed it so runs are reproducible
        np.random.seed(seed_from(cfg.seed, round_, pid, 0x5EC) % 2**32)
        return terms, 1, metrics


def _client_fn(context: Context) -> Any:
    return SecAggClient(context).to_client()


secure_client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
"""Clients of SecAgg+ rounds: the mod masks the submission; only masked integers leave the node."""

plain_client_app = ClientApp(client_fn=_client_fn)
"""Clients of the plain reference rounds: dense fp32 task vectors in the clear."""


def secaggplus_when_asked_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """``secaggplus_mod`` for messages that carry SecAgg+ settings, a pass-through for plain ones."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return cast(Message, call_next(msg, context))


client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_when_asked_mod])
"""Clients that serve secure and plain rounds alike (for runs that compare both on the same nodes)."""
