"""Large payloads in rounds, measured by phase over a simulated wide-area link: one round of N
SuperNodes, fedmerge's round engine against Flower's FedAvg over Flower's own transport, same nodes and
model, same run.

    python -m bench large [--quick] [--clients N] [--params P] [--tensors T] [--link-mbit R] [--repeats K]

Full: N = 8, a model of 2^30 ≈ 1.07 B parameters in bf16 (2 GiB), links of 1000 Mbit/s; quick: N = 3,
64 M parameters (128 MB per dense package) and links of 200 Mbit/s, so the three rounds fit in about
five minutes on two cores. The base is committed to a fresh store (bf16); a localhost
``flower-superlink --insecure`` and N ``flower-supernode --insecure`` run the apps of
``bench/_flower_large`` (``large_app.py``): each node generates its delta (seeded), waits until every
node has its own (a barrier in the benchmark's ClientApp: the uploads start together, so no node's
own work lands in the upload phase), and replies.

**The link** (``bench/wan_link.py``): each node reaches the SuperLink and fedmerge's bulk endpoint
only through its own localhost proxy, a token bucket of ``--link-mbit`` in each direction shared by
all the node's connections, so Flower and fedmerge cross identical links (``--link-mbit 0``: none).

**Three rounds**, repeated ``--repeats`` times (default 2) interleaved, each phase the best of its
repeats: fedmerge at equal bytes (dense bf16 packages, every one through the bulk endpoint), Flower's
FedAvg (fp16 weights: the same two bytes per parameter), fedmerge with its default codec (top-k 10 %
with int8 values and error feedback, the default bulk threshold: a package under it travels inline in
Flower's reply). Memory and round-time figures are those of each mode's first round.

**Phases** (``time.time()`` of every process on this host; ``large_app.py`` says where each is taken):

* upload phase = first byte sent (earliest over nodes) → last package verified. The first byte of a
  node is the first read of its link's upstream after its delta was ready that opens a burst
  (≥ 256 KiB within 1 s: :func:`bench.wan_link.burst_start`; the same rule on both sides, so the
  polls a SuperNode sends anyway are not counted). Last package verified: fedmerge, the last reply
  judged (the bulk upload complete, its sha256 the one the endpoint computed as the bytes arrived,
  and the judge's checks — started when the upload completed; or the inline package decoded and
  checked after its reply); Flower, its replies' arrays received and handed to ``aggregate_train``. Flower's
  grid polls for replies every 3 s: part of what its users wait for, so part of its phase;
* ``*_from_ready``: the same from the earliest moment a node's delta existed (encoding included);
* ``link_time_s``: one dense package's bytes over the link (the nodes upload in parallel), the floor
  of any upload phase at equal bytes; ``link_time_vs_flower`` is that floor over Flower's phase;
* ``on_link_s`` (first byte → the last upload bytes read from the nodes' links before the last reply
  reached the ServerApp, :func:`bench.wan_link.burst_end`), ``arrival_s`` (first byte → last reply
  pulled by the ServerApp) and ``judge_last_s`` (→ its package verified) split the upload phase;
* server phase = last reply pulled by the ServerApp → version committed (fedmerge: merged tensor-major
  from the spool into the store) / the aggregate written and fsynced (Flower).

Figures (last line, one JSON object): ``upload_phase_vs_flower`` (equal bytes) and
``upload_phase_vs_flower_codec``; ``server_phase_over_disk_read``: fedmerge's server phase at equal
bytes / the time to read its N packages once from the spool's disk (written, fsynced, evicted from the
page cache with ``posix_fadvise(DONTNEED)`` first); per-phase seconds of each round; and, as before,
``server_peak_rss_over_model`` ((ServerApp ``VmHWM`` during the round − its ``VmRSS`` just before) /
model bytes), ``round_time_over_disk_read``, ``round_time_vs_flower``, ``merge_time_over_disk_read``
(of the equal-bytes round). Targets (issue: large rounds measured by phase): upload phase ≤ 0.3×
Flower's at equal bytes and ≤ 0.05× with the default codec; server phase ≤ 2× the disk read. Every
process started is ended by its pid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.large_deploy import Deployment, disk_read_s, free_port, make_store
from bench.wan_link import NodeLink, burst_end, burst_start

MODES = ("fedmerge-dense", "flower", "fedmerge-default")


def phases(
    result: dict[str, Any], events: list[dict[str, Any]], mode: str, links: list[NodeLink]
) -> dict[str, Any]:
    """The phase timings of one round (module docstring) from its ServerApp result, the nodes' events
    and the links' upstream logs; None where a timestamp is missing."""
    ready = {
        int(e["node"]): float(e["t"]) for e in events if e["mode"] == mode and e["event"] == "delta-ready"
    }
    starts = {
        node: t
        for node, t_ready in ready.items()
        if node < len(links) and (t := burst_start(links[node].up_reads, after=t_ready)) is not None
    }
    firsts = list(starts.values())
    replies = [float(t) for t in result.get("replies_t") or []]
    last_reply = max(replies) if replies else None
    ends = [
        t
        for node, start in starts.items()
        if last_reply is not None and (t := burst_end(links[node].up_reads, start, last_reply)) is not None
    ]
    verified, committed = result.get("verified_t"), result.get("committed_t")
    first = min(firsts) if firsts else None
    out = {
        "upload_s": None if first is None or verified is None else float(verified) - first,
        "on_link_s": None if first is None or not ends else max(ends) - first,
        "arrival_s": None if first is None or last_reply is None else last_reply - first,
        "judge_last_s": None if last_reply is None or verified is None else float(verified) - last_reply,
        "upload_from_ready_s": None
        if not ready or verified is None
        else float(verified) - min(ready.values()),
        "server_s": None if not replies or committed is None else float(committed) - max(replies),
        "verified_to_committed_s": None if verified is None or committed is None else committed - verified,
        "first_byte_spread_s": None if not firsts else max(firsts) - min(firsts),
    }
    return {k: None if v is None else round(v, 3) for k, v in out.items()}


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def memory_needed(clients: int, params: int) -> int:
    """Bytes the round needs at once, roughly: each node's fp32 delta and its 2-byte package (6 bytes
    per parameter), Flower's ServerApp at ≈ 5× the model's 2 bytes per parameter, and 1 GB of
    processes (SuperLink, SuperNodes, ClientApps, the benchmark)."""
    return clients * 6 * params + 10 * params + (1 << 30)


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best of k: each phase's smallest value over the repeats of one mode (None when none has it)."""
    keys = {k for run in runs for k in run}
    return {k: min((r[k] for r in runs if r.get(k) is not None), default=None) for k in sorted(keys)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench large", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 3, 64 M parameters, 200 Mbit/s links")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--params", type=int, default=None, help="model parameters (bf16)")
    parser.add_argument("--tensors", type=int, default=None, help="tensors the parameters are split into")
    parser.add_argument("--timeout-s", type=float, default=None, help="per flwr run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per mode (best of k)")
    parser.add_argument(
        "--link-mbit", type=float, default=None, help="each node's link, Mbit/s each way (0: none)"
    )
    args = parser.parse_args(argv)

    def given(value: Any, quick: Any, full: Any) -> Any:
        return value if value is not None else (quick if args.quick else full)

    clients, params = given(args.clients, 3, 8), given(args.params, 64_000_000, 1 << 30)
    tensors, link_mbit = given(args.tensors, 64, 256), given(args.link_mbit, 200.0, 1000.0)
    timeout_s, repeats = given(args.timeout_s, 240.0, 1800.0), args.repeats
    if clients < 1 or params < tensors or tensors < 1 or link_mbit < 0 or repeats < 1 or timeout_s <= 0:
        print(
            "--clients, --tensors, --repeats ≥ 1, --params ≥ --tensors, --link-mbit ≥ 0 and --timeout-s > 0",
            file=sys.stderr,
        )
        return 2
    need = memory_needed(clients, params)
    available = int(psutil.virtual_memory().available)
    if need > available:
        print(
            f"{clients} nodes of {params} parameters need ≈ {need / 1e9:.1f} GB of memory and "
            f"{available / 1e9:.1f} GB are available: lower --clients or --params",
            file=sys.stderr,
        )
        return 2
    numel = -(-params // tensors)
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        work = Path(tmp)
        model_bytes = make_store(work / "store", tensors, numel)
        dep = Deployment(work, clients, link_bps=link_mbit * 1e6, bulk_port=free_port())
        common = {"out-dir": str(work), "num-clients": clients, "seed": 0, "timeout-s": timeout_s,
                  "tensors": tensors, "tensor-numel": numel, "bulk-address": f"127.0.0.1:{dep.bulk_port}",
                  "store": str(work / "store"), "spool": str(work / "spool")}  # fmt: skip
        runs: dict[str, list[tuple[dict[str, Any], float]]] = {mode: [] for mode in MODES}
        try:
            dep.up()
            for repeat in range(repeats):  # interleaved: each repeat runs every mode once
                for mode in MODES:
                    kind, _, codec_name = mode.partition("-")  # "flower" or "fedmerge", codec
                    config = {**common, "bench-repeat": repeat, "bench-mode": kind,
                              "bench-codec": codec_name or "dense"}  # fmt: skip
                    runs[mode].append(dep.run(config, timeout_s + 120))
            events = dep.events()
            timings = {
                mode: best(
                    [
                        phases(r, events, f"{mode}/{k}", dep.links)
                        for k, (r, _) in enumerate(runs[mode])
                        if r.get("ok")
                    ]
                )
                for mode in MODES
            }
            link_bytes_up = sum(link.bytes_up for link in dep.links)
        finally:
            dep.stop()
        results = {mode: runs[mode][0][0] for mode in MODES}
        fed = results["fedmerge-dense"]
        if not fed.get("ok"):
            print(
                f"fedmerge round failed: {str(fed.get('error') or fed.get('rejected'))[:2000]}",
                file=sys.stderr,
            )
            return 1
        package_bytes = int(fed["uplink_bytes"]) // clients
        read_s = min(
            disk_read_s(work / "spool" / "disk-read", clients, package_bytes) for _ in range(repeats)
        )
    flower, codec = results["flower"], results["fedmerge-default"]
    flower_ok, codec_ok = bool(flower.get("ok")), bool(codec.get("ok"))
    growth = int(fed["rss_peak"]) - int(fed["rss_base"])
    uplink = 2 * tensors * numel * clients  # Flower's: N fp16 models
    dense_t, flower_t, codec_t = timings["fedmerge-dense"], timings["flower"], timings["fedmerge-default"]
    out: dict[str, Any] = {
        "clients": clients,
        "params": tensors * numel,
        "model_bytes": model_bytes,
        "package_bytes": package_bytes,
        "codec_package_bytes": int(codec["uplink_bytes"]) // clients if codec_ok else None,
        "link_mbit": link_mbit,
        "link_bytes_up": link_bytes_up,
        "link_time_s": round(8 * package_bytes / (link_mbit * 1e6), 3) if link_mbit else None,
        "link_time_vs_flower": _ratio(8 * package_bytes / (link_mbit * 1e6), flower_t.get("upload_s"))
        if link_mbit and flower_ok
        else None,
        "upload_phase_s": dense_t.get("upload_s"),
        "upload_phase_flower_s": flower_t.get("upload_s") if flower_ok else None,
        "upload_phase_codec_s": codec_t.get("upload_s") if codec_ok else None,
        "upload_from_ready_s": dense_t.get("upload_from_ready_s"),
        "upload_from_ready_flower_s": flower_t.get("upload_from_ready_s") if flower_ok else None,
        "upload_from_ready_codec_s": codec_t.get("upload_from_ready_s") if codec_ok else None,
        "server_phase_s": dense_t.get("server_s"),
        "server_phase_flower_s": flower_t.get("server_s") if flower_ok else None,
        "server_phase_codec_s": codec_t.get("server_s") if codec_ok else None,
        "repeats": repeats,
        "phases": timings,
        "fedmerge_round_s": round(float(fed["round_s"]), 3),
        "fedmerge_run_wall_s": round(runs["fedmerge-dense"][0][1], 3),
        "server_rss_base_bytes": int(fed["rss_base"]),
        "server_rss_peak_bytes": int(fed["rss_peak"]),
        "server_warm_up_rss_bytes": int(fed["rss_warm_up"]),
        "fedmerge_merge_s": round(float(fed["merge_s"]), 3),
        "merge_time_over_disk_read": round(float(fed["merge_s"]) / read_s, 2),
        "disk_read_s": round(read_s, 3),
        "flower_round_s": round(float(flower["round_s"]), 3) if flower_ok else None,
        "codec_round_s": round(float(codec["round_s"]), 3) if codec_ok else None,
        "flower_server_rss_over_model": round(
            (int(flower["rss_peak"]) - int(flower["rss_base"])) / model_bytes, 3
        )
        if flower_ok
        else None,
        "failures": [
            f"{m}/{k}: {str(r.get('error') or r.get('rejected'))[:300]}"
            for m in MODES
            for k, (r, _) in enumerate(runs[m])
            if not r.get("ok")
        ],
        "flower_failures": [] if flower_ok else [f"{uplink} B: {str(flower.get('error'))[:300]}"],
        "flower_largest_ok_bytes": uplink if flower_ok else 0,
        "server_peak_rss_over_model": round(growth / model_bytes, 3),
        "round_time_over_disk_read": round(float(fed["round_s"]) / read_s, 2),
        "round_time_vs_flower": _ratio(float(fed["round_s"]), float(flower["round_s"]))
        if flower_ok
        else None,
        "upload_phase_vs_flower": _ratio(dense_t.get("upload_s"), flower_t.get("upload_s"))
        if flower_ok
        else None,
        "upload_phase_vs_flower_codec": _ratio(codec_t.get("upload_s"), flower_t.get("upload_s"))
        if flower_ok and codec_ok
        else None,
        "server_phase_over_disk_read": _ratio(dense_t.get("server_s"), read_s, 2),
        "command": "python -m bench " + " ".join(["large", *argv]),
    }
    for key in ("link_mbit", "upload_phase_s", "upload_phase_flower_s", "upload_phase_codec_s",
                "server_phase_s", "server_phase_flower_s", "disk_read_s", "fedmerge_merge_s",
                "server_peak_rss_over_model", "round_time_vs_flower", "upload_phase_vs_flower",
                "upload_phase_vs_flower_codec", "server_phase_over_disk_read"):  # fmt: skip
        print(f"{key:>30}: {out[key]}")
    print(json.dumps(out))
    return 0
