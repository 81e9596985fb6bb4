"""ServerApp and ClientApp of ``python -m bench large`` (one module: the FAB holds no package).

Run config (``pyproject.toml``): ``bench-mode`` is ``fedmerge`` or ``flower``; the model is ``tensors``
tensors of ``tensor-numel`` entries (bf16 in the store; fp16 on Flower's side, which numpy lacks bf16
for: the same two bytes per parameter).

* ``fedmerge``: :class:`fedmerge.flower.server.federation.Federation` runs one round with
  ``aggregator='fedavg'``,
  dense bf16 packages (codec density 1, no error feedback) and the bulk endpoint on 127.0.0.1 with
  threshold 0 (every package goes through it). The nodes are declared holders of the base (they are
  given it out of band, as for Flower below): only the uplink is measured.
* ``flower``: ``flwr.serverapp.strategy.FedAvg`` for one round, initial arrays of one element (so
  nothing large goes down); each node replies with its full fp16 weights in ``"arrays"``.

Each node's values are N(0, 10⁻³) from a generator seeded by (seed, partition, tensor). The ServerApp
writes ``<out-dir>/<mode>-result.json``: ``ok``, ``round_s`` (push of the train messages → merged
model committed or aggregated), ``rss_base`` (``VmRSS`` before the round) and ``rss_peak`` (``VmHWM``
after the round, reset with ``clear_refs`` first), ``accepted``, ``error`` on failure.
"""

from __future__ import annotations

import json
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


def _fedmerge_round(grid: Grid, c: dict[str, Any]) -> dict[str, Any]:
    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.federation import Federation, wait_for_nodes
    from fedmerge.store import ModelStore

    n = int(c["num-clients"])
    cfg = parse_run_config(
        {
            "store": str(c["store"]), "num-rounds": 1, "min-clients": n, "min-valid": n, "fraction": 1.0,
            "aggregator": "fedavg", "codec-density": 1.0, "codec-values": "bf16",
            "codec-error-feedback": False, "server-eval": False, "init-base": False, "max-retries": 0,
            "round-deadline-s": float(c["timeout-s"]), "wait-for-nodes-s": 600.0,
            "max-package-bytes": 1 << 40, "seed": int(c["seed"]),
            "bulk-address": "127.0.0.1:0", "bulk-threshold-bytes": 0, "bulk-spool-dir": str(c["spool"]),
            "bulk-spool-reserve-bytes": 0,
        }
    )  # fmt: skip
    with ModelStore.open(cfg.store) as store:
        base = store.get("latest")
        nodes = wait_for_nodes(grid, n, 600.0)
        federation = Federation(grid, cfg, store)
        federation.holders[base.id] = set(nodes)  # the nodes hold the base already: uplink only
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
        "uplink_bytes": report.uplink_bytes,
        "rejected": [f"{o.client_id}: {o.reason}" for o in report.rejected],
    }  # fmt: skip


def _flower_round(grid: Grid, c: dict[str, Any]) -> dict[str, Any]:
    from flwr.serverapp.strategy import FedAvg

    n = int(c["num-clients"])
    end = time.monotonic() + 600.0
    while len(list(grid.get_node_ids())) < n and time.monotonic() < end:
        time.sleep(0.2)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
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
        "peak_reset": reset, "accepted": n if numel == expected else 0,
    }  # fmt: skip


@server.main()
def main(grid: Grid, context: Context) -> None:
    from fedmerge.memory import use_mmap_for_large_allocations

    use_mmap_for_large_allocations()  # as fedmerge's ServerApp does (server/app.py); both sides alike
    c = dict(context.run_config)
    out = Path(str(c["out-dir"])) / f"{c['bench-mode']}-result.json"
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
        arrays = ArrayRecord({n: _values(c, partition, i, torch.float16) for i, n in enumerate(names)})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)
    from fedmerge.codec import CodecConfig, PackageMeta
    from fedmerge.flower.client.reply import _base_ids, encode_reply, keep_bulk_settings

    round_, version_id, version_hash = _base_ids(msg.content)
    keep_bulk_settings(msg.content, context)
    delta = {n: _values(c, partition, i, torch.float32) for i, n in enumerate(names)}
    codec = CodecConfig(sparsify="none", density=1.0, values="bf16", error_feedback=False)
    meta = PackageMeta(f"node-{partition}", round_, version_id, version_hash, num_examples=10)
    content, _ = encode_reply(delta, codec, meta, context, {})
    return Message(content, reply_to=msg)
