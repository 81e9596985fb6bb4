"""ClientApp of the Flower reference: reply to ``train`` with the payload as one uint8 ``Array``.

The train message carries only ``payload-bytes`` and ``seed`` (a ``ConfigRecord`` named ``config``);
the node generates the bytes itself (see ``make_payload``) so nothing large travels down. The reply
holds ``ArrayRecord({"payload": Array(uint8[n])})`` under ``payload`` and a ``ConfigRecord`` under
``meta`` with ``bytes`` (int), ``sha256`` (hex of the raw bytes), ``prepare-s`` (generation plus
hashing time on the node, included in the ServerApp's measurement, reported separately) and
``received-at`` (``time.time()`` when this function started; same host as the ServerApp).
"""

from __future__ import annotations

import hashlib
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flowerbulk.payload import make_payload

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Generate ``payload-bytes`` bytes from ``seed`` and send them back with their length and sha256."""
    received_at = time.time()
    config = msg.content.config_records["config"]
    n_bytes, seed = config["payload-bytes"], config["seed"]
    if not (isinstance(n_bytes, int) and isinstance(seed, int)):
        raise TypeError(f"payload-bytes and seed must be integers, got {dict(config)}")
    t0 = time.perf_counter()
    payload = make_payload(n_bytes, seed)
    digest = hashlib.sha256(memoryview(payload)).hexdigest()
    array = Array(payload)
    prepare_s = time.perf_counter() - t0
    del payload
    meta = ConfigRecord(
        {"bytes": n_bytes, "sha256": digest, "prepare-s": prepare_s, "received-at": received_at}
    )
    content = RecordDict({"payload": ArrayRecord({"payload": array}), "meta": meta})
    return Message(content, reply_to=msg)
