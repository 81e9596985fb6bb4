"""ServerApp and ClientApp of ``python -m bench large`` (one module: the FAB holds no package).

Run config (``pyproject.toml``): ``bench-mode`` is ``fedmerge`` or ``flower``; the model is ``tensors``
tensors of ``tensor-numel`` entries (bf16 in the store; fp16 on Flower's side, which numpy lacks bf16
for: the same two bytes per parameter).

* ``fedmerge``: :class:`fedmerge.flower.server.federation.Federation` runs one round with
  ``aggregator='fedavg'`` and the bulk endpoint on ``bulk-address`` (127.0.0.1). ``bench-codec =
  "dense"``: dense bf16 packages (codec density 1, no error feedback), bulk threshold 0 (every package
  goes through the endpoint): the same bytes as Flower's fp16. ``bench-codec = "default"``: the run
  config's codec and bulk threshold left at fedmerge's defaults (top-k with int8 values and error
  feedback; a package under the threshold travels inline in Flower's reply). The nodes are declared
  holders of the base (they are given it out of band, as for Flower below): only the uplink is
  measured. A node whose node config names ``bench-bulk-via`` dials the endpoint there (its simulated
  link, ``bench/wan_link.py``) instead of the address the train message offers.
* ``flower``: ``flwr.serverapp.strategy.FedAvg`` for one round, initial arrays of one element (so
  nothing large goes down); each node replies with its full fp16 weights in ``"arrays"``. The
  aggregated arrays are written to ``<out-dir>/flower-aggregate.safetensors`` and fsynced: Flower's
  counterpart of fedmerge's committed version.

Each node's values are N(0, 10⁻³) from a generator seeded by (seed, partition, tensor). The ServerApp
writes ``<out-dir>/<mode>-result.json``: ``ok``, ``round_s`` (push of the train messages → merged
model committed or aggregated), ``rss_base`` (``VmRSS`` before the round) and ``rss_peak`` (``VmHWM``
after the round, reset with ``clear_refs`` first), ``accepted``, ``error`` on failure, and the phase
timestamps (``time.time()``, one clock for all processes of the host):

* ``replies_t``: when each reply was pulled by the ServerApp (the grid's ``pull_messages``, timed);
* ``verified_t``: fedmerge, the moment the last reply was judged (its package received and verified:
  checksum and the judge's checks, which start on a bulk upload as soon as it completes) =
  ``committed_t`` − the round report's ``merge_s``; Flower, the
  moment its ``aggregate_train`` was handed the replies (all arrays received);
* ``committed_t``: fedmerge, the version committed (the round's spool released right after the
  commit); Flower, the aggregate written and fsynced.

Each node appends ``{"mode", "node", "event", "t"}`` lines (``mode``: :func:`_mode`, with the
``bench-repeat`` the benchmark numbers its rounds by) to ``<out-dir>/events.jsonl``:
``delta-ready`` (its own work done: the delta exists, and every other node's too: the nodes wait for
each other, :func:`_barrier`, so that the uploads start together) and ``reply-handed`` (package encoded and,
for fedmerge above the threshold, uploaded; Flower: the reply handed to Flower's transport).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _event(c: dict[str, Any], node: int, event: str) -> None:
    line = json.dumps({"mode": _mode(c), "node": node, "event": event, "t": time.time()}) + "\n"
    fd = os.open(Path(str(c["out-dir"])) / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _barrier(c: dict[str, Any], partition: int) -> None:
    """Wait until every node of this round has its delta (a file per node in ``<out-dir>``), so that
    the uploads start together and no node's own work is counted in another's upload phase."""
    folder = Path(str(c["out-dir"])) / f"barrier-{_mode(c).replace('/', '-')}"
    folder.mkdir(exist_ok=True)
    (folder / str(partition)).touch()
    end = time.monotonic() + float(c["timeout-s"])
    while sum(1 for _ in folder.iterdir()) < int(c["num-clients"]) and time.monotonic() < end:
        time.sleep(0.01)


def _mode(c: dict[str, Any]) -> str:
    """The round's label: ``flower``, ``fedmerge-dense`` or ``fedmerge-default``, and ``/<repeat>``."""
    mode = "flower" if c["bench-mode"] == "flower" else f"fedmerge-{c['bench-codec']}"
    return f"{mode}/{c['bench-repeat']}"


def _time_replies(grid: Grid, times: list[float]) -> None:
    """Record when each reply reaches the ServerApp (the grid's own pull, timed on this instance)."""
    pull = grid.pull_messages

    def timed_pull(message_ids: Any) -> list[Message]:
        replies = list(pull(message_ids))
        now = time.time()
        times.extend(now for _ in replies)
        return replies

    grid.pull_messages = timed_pull  # type: ignore[method-assign]


def _fedmerge_round(grid: Grid, c: dict[str, Any]) -> dict[str, Any]:
    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.bulk_endpoint import bulk_endpoint_for
    from fedmerge.flower.server.federation import Federation, wait_for_nodes
    from fedmerge.store import ModelStore

    n = int(c["num-clients"])
    dense = {"codec-density": 1.0, "codec-values": "bf16", "codec-error-feedback": False,
             "bulk-threshold-bytes": 0}  # fmt: skip
    cfg = parse_run_config(
        {
            "store": str(c["store"]), "num-rounds": 1, "min-clients": n, "min-valid": n, "fraction": 1.0,
            "aggregator": "fedavg", "server-eval": False, "init-base": False, "max-retries": 0,
            "round-deadline-s": float(c["timeout-s"]), "wait-for-nodes-s": 600.0,
            "max-package-bytes": 1 << 40, "seed": int(c["seed"]),
            "bulk-address": str(c["bulk-address"]), "bulk-spool-dir": str(c["spool"]),
            "bulk-spool-reserve-bytes": 0, **(dense if c["bench-codec"] == "dense" else {}),
        }
    )  # fmt: skip
    replies_t: list[float] = []
    committed_t: list[float] = []
    _time_replies(grid, replies_t)
    with ModelStore.open(cfg.store) as store, bulk_endpoint_for(cfg, store) as bulk:
        base = store.get("latest")
        nodes = wait_for_nodes(grid, n, 600.0)
        federation = Federation(grid, cfg, store)
        federation.holders[base.id] = set(nodes)  # the nodes hold the base already: uplink only
        federation.bulk = bulk  # started here so that its commit can be timed (run() keeps it)
        close_round = bulk.close_round

        def timed_close(round_: int, attempt: int) -> None:
            committed_t.append(time.time())  # called right after the commit
            close_round(round_, attempt)

        bulk.close_round = timed_close  # type: ignore[method-assign]
        rss_before_warm_up = _status("VmRSS")
        federation.warm_up()  # code (numba kernels) loaded before the round, as run() does first
        rss_warm_up = _status("VmRSS") - rss_before_warm_up
        reset = _reset_peak()
        rss_base = _status("VmRSS")
        reports = federation.run()
        rss_peak = _status("VmHWM")
    report = reports[-1]
    return {
        "ok": report.version_id is not None, "round_s": report.wall_s, "rss_base": rss_base,
        "rss_peak": rss_peak, "peak_reset": reset, "accepted": len(report.accepted),
        "rss_warm_up": rss_warm_up, "merge_s": report.merge_s,
        "uplink_bytes": report.uplink_bytes, "replies_t": replies_t,
        "committed_t": committed_t[0] if committed_t else None,
        "verified_t": committed_t[0] - report.merge_s if committed_t else None,
        "rejected": [f"{o.client_id}: {o.reason}" for o in report.rejected],
    }  # fmt: skip


def _flower_round(grid: Grid, c: dict[str, Any]) -> dict[str, Any]:
    from collections.abc import Iterable

    from flwr.serverapp.strategy import FedAvg
    from safetensors.numpy import save_file

    saved = Path(str(c["out-dir"])) / "flower-aggregate.safetensors"
    marks: dict[str, float] = {}

    class SavingFedAvg(FedAvg):
        """FedAvg whose aggregate is written to disk and fsynced (what "committed" means here)."""

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            marks["verified_t"] = time.time()
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:
                save_file({k: v.numpy() for k, v in arrays.items()}, str(saved))
                with saved.open("rb") as fh:
                    os.fsync(fh.fileno())
                marks["committed_t"] = time.time()
            return arrays, metrics

    n = int(c["num-clients"])
    end = time.monotonic() + 600.0
    while len(list(grid.get_node_ids())) < n and time.monotonic() < end:
        time.sleep(0.2)
    replies_t: list[float] = []
    _time_replies(grid, replies_t)
    strategy = SavingFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    reset = _reset_peak()
    rss_base = _status("VmRSS")
    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(1, np.float16)]), num_rounds=1,
        timeout=float(c["timeout-s"]),
    )  # fmt: skip
    round_s = time.perf_counter() - t0
    rss_peak = _status("VmHWM")
    arrays = result.arrays
    numel = 0 if arrays is None else sum(int(np.prod(a.shape)) for a in arrays.values())
    expected = int(c["tensors"]) * int(c["tensor-numel"])
    return {
        "ok": numel == expected, "round_s": round_s, "rss_base": rss_base, "rss_peak": rss_peak,
        "peak_reset": reset, "accepted": n if numel == expected else 0, "replies_t": replies_t,
        "verified_t": marks.get("verified_t"), "committed_t": marks.get("committed_t"),
    }  # fmt: skip


@server.main()
def main(grid: Grid, context: Context) -> None:
    from fedmerge.memory import use_mmap_for_large_allocations

    use_mmap_for_large_allocations()  # as fedmerge's ServerApp does (server/app.py); both sides alike
    c = dict(context.run_config)
    out = Path(str(c["out-dir"])) / f"{_mode(c).replace('/', '-')}-result.json"
    try:
        result = _fedmerge_round(grid, c) if c["bench-mode"] == "fedmerge" else _flower_round(grid, c)
    except Exception as exc:  # the benchmark reads the reason from the result file
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc()[-3000:],
        }
    out.write_text(json.dumps(result))


def _values(c: dict[str, Any], partition: int, i: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(c["seed"]) * 1_000_003 + partition * 10_007 + i)
    return (torch.randn(int(c["tensor-numel"]), generator=gen) * 1e-3).to(dtype)


@client.train()
def train(msg: Message, context: Context) -> Message:
    c = dict(context.run_config)
    partition = int(context.node_config.get("partition-id", 0))
    names = [f"layer{i:03d}.weight" for i in range(int(c["tensors"]))]
    if c["bench-mode"] == "flower":
        values = {n: _values(c, partition, i, torch.float16) for i, n in enumerate(names)}
        _barrier(c, partition)
        _event(c, partition, "delta-ready")
        content = RecordDict({"arrays": ArrayRecord(values), "metrics": MetricRecord({"num-examples": 10})})
        _event(c, partition, "reply-handed")
        return Message(content, reply_to=msg)
    from fedmerge.codec import CodecConfig, PackageMeta
    from fedmerge.flower.client.bulk import ADDRESS_KEY
    from fedmerge.flower.client.reply import (
        BULK_RECORD,
        _base_ids,
        config_record,
        encode_reply,
        keep_bulk_settings,
        message_settings,
    )

    round_, version_id, version_hash = _base_ids(msg.content)
    keep_bulk_settings(msg.content, context)
    via = context.node_config.get("bench-bulk-via")
    bulk = config_record(context.state, BULK_RECORD)
    if via and bulk is not None:
        bulk[ADDRESS_KEY] = str(via)  # this node's simulated link to the endpoint
    conf = message_settings(msg.content)
    codec = CodecConfig(
        sparsify=conf["codec-sparsify"], density=float(conf["codec-density"]), values=conf["codec-values"],
        error_feedback=bool(conf["codec-error-feedback"]),
    )  # fmt: skip
    delta = {n: _values(c, partition, i, torch.float32) for i, n in enumerate(names)}
    _barrier(c, partition)
    _event(c, partition, "delta-ready")
    meta = PackageMeta(f"node-{partition}", round_, version_id, version_hash, num_examples=10)
    content, _ = encode_reply(delta, codec, meta, context, {})
    _event(c, partition, "reply-handed")
    return Message(content, reply_to=msg)
