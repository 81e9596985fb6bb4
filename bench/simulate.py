"""Simulation throughput: client updates per minute of fedmerge's runner versus a plain Flower simulation.

    python -m bench simulate [--quick]

Both sides run on Flower's simulation runtime (``flwr run`` on a private SuperLink in simulation mode,
:func:`fedmerge.flower.simulation.run_simulation_app`) in the same run, in separate processes, with the
same task (digits), partitions, local training and number of virtual clients: fedmerge's
ServerApp/ClientApp (``CODEC``: top-20 % sign task vectors up and down with error feedback — fixed,
so that CI's lines of this regression guard compare runtimes, not codecs: the smaller rank-8/4 factor
pairs of ``bench/rounds.py`` encode 1.5 ms slower per update —, streaming FedAvg, a
committed version and a server evaluation per round; ``client-test-metrics = false``: a client trains
and replies, as Flower's does, without evaluating its test split inside ``train``) versus
``flwr.serverapp.strategy.FedAvg`` with a quickstart-style dense fp32 ClientApp (see
``bench/rounds.py``, which runs both). Updates per minute = clients per round × 60 / steady-state round
time (rounds 2…R). Two federation sizes: 20 clients (``updates_per_min_vs_flower``) and 100 clients
(``updates_per_min_vs_flower_100``); quick: 5 and 3 rounds, one run per side; full: 5 rounds each, two
interleaved runs per side, best of 2. ``--gpu-fraction F``: every virtual client of both sides trains on
F of one GPU (Ray's ``num_gpus``; fedmerge's ``client-device = cuda``, Flower's client moves its model
and batches there as its quickstart does); the servers evaluate on the CPU.
Final accuracies of both sides are printed (fedmerge's codec is lossy: its accuracy differs from
Flower's dense exchange; ``python -m bench simulate_profile --accuracy`` measures fedmerge at the codec
that sends Flower's bytes, and ``python -m bench simulate_profile`` where a round's time goes, by
phase). Last line: one JSON object (compare two with ``python -m bench compare``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmerge_bench.rounds import child, client_device, steady
from fedmerge_bench.timing import interleaved, load_average

# the codec of every simulate measurement since 2026-12-07 05:00 (STC: top-20 % sign both ways)
CODEC: dict[str, Any] = {
    "codec-density": 0.2, "codec-values": "sign", "downlink-density": 0.2, "downlink-values": "sign",
}  # fmt: skip


CODEC_LABEL = (
    f"top-{CODEC['codec-density']:.0%} {CODEC['codec-values']} up, "
    f"top-{CODEC['downlink-density']:.0%} {CODEC['downlink-values']} down, error feedback"
)


def gpu_problem(fraction: float) -> str | None:
    """Why ``--gpu-fraction fraction`` cannot run here, or None (0 = CPU, always possible)."""
    if fraction == 0:
        return None
    if not 0 < fraction <= 1:  # NaN fails too
        return f"--gpu-fraction must be in (0, 1], got {fraction:g}"
    import torch

    if not torch.cuda.is_available():
        return f"--gpu-fraction {fraction:g} needs a CUDA GPU and torch sees none (leave it out for the CPU)"
    return None


def measure(
    clients: int, rounds: int, repeats: int, gpu_fraction: float = 0.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each side ``repeats`` times, interleaved; the run with the best steady round time per side.
    ``gpu_fraction`` > 0: every virtual client of both sides trains on that fraction of the GPU."""
    runs: dict[str, list[dict[str, Any]]] = {"fedmerge": [], "flower": []}

    def side(kind: str) -> Any:
        options: dict[str, Any] = {"gpu_fraction": gpu_fraction} if gpu_fraction > 0 else {}
        if kind == "fedmerge":
            options["codec"] = CODEC
        return lambda: runs[kind].append(child(kind, clients, rounds, options=options))

    interleaved(side("fedmerge"), side("flower"), repeats, warmup=False)
    ours = min(runs["fedmerge"], key=lambda r: steady(r["round_s"]))
    ref = min(runs["flower"], key=lambda r: steady(r["round_s"]))
    return ours, ref


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one run per side: 20 clients × 5, 100 × 3 rounds")
    ap.add_argument(
        "--gpu-fraction", type=float, default=0.0, metavar="F",
        help="each virtual client of both sides trains on F of one GPU (0 < F ≤ 1; default 0: CPU)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    problem = gpu_problem(args.gpu_fraction)
    if problem:
        print(f"python -m bench simulate: {problem}", file=sys.stderr)
        return 2
    console = Console()
    sizes = [(20, 5), (100, 3)] if args.quick else [(20, 5), (100, 5)]
    repeats = 1 if args.quick else 2
    summary: dict[str, Any] = {}
    for clients, rounds in sizes:
        ours, ref = measure(clients, rounds, repeats, args.gpu_fraction)
        ours_upm = clients * 60 / steady(ours["round_s"])
        ref_upm = clients * 60 / steady(ref["round_s"])
        table = Table(title=f"client updates per minute, {clients} virtual clients, digits, {rounds} rounds")
        for col in ("runner", "s per round (2…R)", "updates / min", "final accuracy"):
            table.add_column(col, justify="right")
        for name, res, upm in (("fedmerge", ours, ours_upm), ("Flower FedAvg", ref, ref_upm)):
            table.add_row(name, f"{steady(res['round_s']):.3f}", f"{upm:,.0f}", f"{res['accuracy'][-1]:.3f}")
        console.print(table)
        suffix = "" if clients == 20 else f"_{clients}"
        summary |= {
            f"updates_per_min_vs_flower{suffix}": round(ours_upm / ref_upm, 4),
            f"fedmerge_updates_per_min{suffix}": round(ours_upm, 1),
            f"flower_updates_per_min{suffix}": round(ref_upm, 1),
            f"fedmerge_round_s{suffix}": round(steady(ours["round_s"]), 4),
            f"flower_round_s{suffix}": round(steady(ref["round_s"]), 4),
            f"fedmerge_accuracy{suffix}": round(ours["accuracy"][-1], 4),
            f"flower_accuracy{suffix}": round(ref["accuracy"][-1], 4),
        }
    summary["codec"] = CODEC_LABEL
    share = f" ({args.gpu_fraction:g} GPU per client)" if args.gpu_fraction > 0 else ""
    summary["client_device"] = client_device(args.gpu_fraction) + share
    summary["clients"] = 20
    summary["load_average_1min"] = round(load_average()[0], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
