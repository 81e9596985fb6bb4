"""ServerApp of the Flower reference: one ``train`` message out, the payload back, stored durably.

Contract (run config keys, see ``pyproject.toml``): waits up to ``wait-for-nodes-s`` for a SuperNode,
pushes one ``train`` message carrying ``payload-bytes`` and ``seed``, pulls the reply every ``poll-s``
seconds (``Grid.send_and_receive`` polls every 3 s, which would dominate small timings), checks the
received bytes' length and sha256 against the node's ``meta`` record, writes them to
``<out-dir>/flower-payload.bin`` and fsyncs it. Writes ``<out-dir>/flower-result.json`` (also on
failure, with ``ok: false`` and ``error``):

- ``reply_s``: push of the message -> reply pulled and deserialized;
- ``durable_s``: push of the message -> payload verified, written and fsynced (the figure compared);
- ``dispatch_s``: push of the message -> the ClientApp's ``train`` starts (the SuperNode's polling for
  work and the ClientApp process start-up; wall clocks of the same host), ``node_prepare_s``: payload
  generation and hashing on the node; both are part of ``durable_s``;
- ``rss_base``/``rss_peak``: this process's ``VmRSS`` just before the push and its ``VmHWM`` at the end,
  after resetting the peak with ``clear_refs`` (``peak_reset`` says whether that worked).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from flowerbulk.payload import proc_status_bytes, reset_peak_rss

app = ServerApp()


class FlowerBulkError(RuntimeError):
    """The reference exchange failed: no node, no reply in time, an error reply, or a corrupted payload."""


def _wait_for_node(grid: Grid, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if nodes:
            return nodes[0]
        time.sleep(0.2)
    raise FlowerBulkError(f"no SuperNode connected within {timeout_s} s")


def _exchange(grid: Grid, cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    n_bytes = int(cfg["payload-bytes"])
    node = _wait_for_node(grid, float(cfg["wait-for-nodes-s"]))
    config = ConfigRecord({"payload-bytes": n_bytes, "seed": int(cfg["seed"])})
    msg = Message(RecordDict({"config": config}), dst_node_id=node, message_type="train")
    peak_reset = reset_peak_rss()
    rss_base = proc_status_bytes("VmRSS")
    pushed_at = time.time()
    t0 = time.perf_counter()
    (msg_id,) = list(grid.push_messages([msg]))
    deadline = time.monotonic() + float(cfg["reply-timeout-s"])
    replies: list[Message] = []
    while not replies:
        if time.monotonic() > deadline:
            raise FlowerBulkError(f"no reply within {cfg['reply-timeout-s']} s")
        time.sleep(float(cfg["poll-s"]))
        replies = list(grid.pull_messages([msg_id]))
    reply = replies[0]
    if reply.has_error():
        raise FlowerBulkError(f"error reply from node {node}: {reply.error.code} {reply.error.reason}")
    received = reply.content.array_records["payload"]["payload"].numpy()
    reply_s = time.perf_counter() - t0
    meta = reply.content.config_records["meta"]
    reported_bytes, reported_sha = meta["bytes"], meta["sha256"]
    prepare_s, received_at = meta["prepare-s"], meta["received-at"]
    if not (
        isinstance(reported_bytes, int)
        and isinstance(reported_sha, str)
        and isinstance(prepare_s, float)
        and isinstance(received_at, float)
    ):
        raise FlowerBulkError(f"malformed meta record from node {node}: {dict(meta)}")
    view = np.ascontiguousarray(received, dtype=np.uint8).data.cast("B")
    digest = hashlib.sha256(view).hexdigest()
    if view.nbytes != n_bytes or view.nbytes != reported_bytes or digest != reported_sha:
        raise FlowerBulkError(
            f"payload mismatch: got {view.nbytes} bytes sha256 {digest}, node reported "
            f"{reported_bytes} bytes sha256 {reported_sha}, asked for {n_bytes} bytes"
        )
    target = out_dir / "flower-payload.bin"
    with target.open("wb") as fh:
        fh.write(view)
        fh.flush()
        os.fsync(fh.fileno())
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    durable_s = time.perf_counter() - t0
    return {
        "ok": True,
        "bytes": view.nbytes,
        "sha256": digest,
        "reply_s": reply_s,
        "durable_s": durable_s,
        "node_prepare_s": prepare_s,
        "dispatch_s": received_at - pushed_at,
        "rss_base": rss_base,
        "rss_peak": proc_status_bytes("VmHWM"),
        "peak_reset": peak_reset,
        "pid": os.getpid(),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the exchange once and write ``flower-result.json`` into ``out-dir`` (then re-raise failures)."""
    cfg = dict(context.run_config)
    out_dir = Path(str(cfg["out-dir"]))
    result: dict[str, Any]
    try:
        result = _exchange(grid, cfg, out_dir)
    except BaseException as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "pid": os.getpid()}
        raise
    finally:
        tmp = out_dir / "flower-result.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(out_dir / "flower-result.json")
