"""Names of the records that fedmerge's ServerApp and ClientApps exchange inside a Flower ``RecordDict``.

Shared by both sides, so a client process imports these names without the server's round engine
(aggregators, numba, the store). Plain Flower clients only need Flower's own conventions: ``"arrays"``,
``"config"`` and ``"metrics"`` (with ``"num-examples"``).
"""

from __future__ import annotations

BASE_RECORD = "fedmerge.base"
UPDATE_RECORD = "fedmerge.update"  # compressed downlink: parent → base update (fedmerge.flower.downlink)
CONFIG_RECORD = "fedmerge.config"
METRICS_RECORD = "metrics"

__all__ = ["BASE_RECORD", "CONFIG_RECORD", "METRICS_RECORD", "UPDATE_RECORD"]
