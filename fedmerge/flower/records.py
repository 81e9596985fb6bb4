"""Names of the records that fedmerge's ServerApp and ClientApps exchange inside a Flower ``RecordDict``.

Shared by both sides, so a client process imports these names without the server's round engine
(aggregators, numba, the store).

A ``train`` message follows Flower's own strategies (``flwr.serverapp.strategy.FedAvg``):

* ``"arrays"`` (:data:`ARRAYS_RECORD`): the base model's full weights, an ``ArrayRecord`` (left out
  only for nodes known to be fedmerge clients that already hold the base or get a compressed update);
* ``"config"`` (:data:`CONFIG_RECORD`): the training settings, a ``ConfigRecord`` (``server-round``,
  ``lr``, ``local-epochs``, ``batch-size``, plus fedmerge's ``task``, ``mode``, ``seed`` …).

fedmerge's extras travel beside them: ``"fedmerge.config"`` (:data:`FEDMERGE_RECORD`: base version
id and content hash, codec, DP and fault settings) and, for the compressed downlink,
``"fedmerge.update"`` / ``"fedmerge.update-meta"``. A plain Flower client ignores them and replies
``"arrays"`` + ``"metrics"`` (with ``"num-examples"``); a fedmerge client replies a codec package in
``"fedmerge.delta"`` (:mod:`fedmerge.flower.transport`) + ``"metrics"``.
"""

from __future__ import annotations

ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
FEDMERGE_RECORD = "fedmerge.config"
UPDATE_RECORD = "fedmerge.update"  # compressed downlink: parent → base update (fedmerge.flower.downlink)
UPDATE_META_RECORD = "fedmerge.update-meta"
BASE_RECORD = ARRAYS_RECORD  # the base weights travel as Flower's "arrays"

__all__ = [
    "ARRAYS_RECORD",
    "BASE_RECORD",
    "CONFIG_RECORD",
    "FEDMERGE_RECORD",
    "METRICS_RECORD",
    "UPDATE_META_RECORD",
    "UPDATE_RECORD",
]
