"""Accuracy against bytes: fedmerge's codecs and published compressors' operating points against Flower.

    python -m bench frontier [--quick] [--task digits|tiny_lm] [--seeds N] [--rounds R] [--write-docs]

Every point is a whole federation on Flower's simulation engine (``bench/rounds.py``'s legs: 10 clients,
Dirichlet α = 0.5, FedAvg semantics, the same local training on both sides), run once per seed, with the
codec's run-config keys for both directions. The reference is Flower's ``FedAvg`` with a dense fp32
quickstart-style ClientApp on the same seeds. For each point: bytes per round up + down over rounds
2…R and over all rounds (round 1 ships the base to every fedmerge node), each as a fraction of
Flower's, and the final round's server accuracy minus Flower's on the same seed (mean, min and max
over seeds).

The points (``POINTS``):

* fedmerge's top-k with int4 values both ways (20 %, ``bench rounds``' codec before sign values, and
  50 %) and with sign values — top-k + sign + error feedback both ways is sparse ternary compression
  (STC, Sattler et al. 2019, built for non-IID federated learning in both directions) at several
  densities;
* low-rank factor pairs of every weight matrix both ways (``codec-rank``/``downlink-rank``, the
  truncated SVD with error feedback, as PowerSGD — Vogels et al. 2019 — approximates it) with int4
  factors, biases top-20 % int4, at one rank both ways (2 to 16) and at a lower rank down than up (the merged
  update each node receives loses less to a low rank than a node's own update does);
* the operating point of Deep Gradient Compression (Lin et al. 2018) that fedmerge reproduces: top-k
  with error feedback ("gradient accumulation") of fp32 values on the uplink only, the downlink dense
  (DGC compresses what nodes send; its momentum correction and warm-up are not reproduced), not
  deflated.

fedmerge's own points are deflated when that makes a package smaller (``codec-deflate``,
``downlink-deflate``: the apps' default); one rank-8 point is also run without, to show what it saves.

The last line is one JSON object: per point ``bytes_vs_flower``, ``bytes_all_rounds_vs_flower``,
``accuracy_delta_points`` (mean over seeds) and its per-seed values, and
``smallest_bytes_within_half_point``: the smallest ``bytes_vs_flower`` whose mean accuracy is at most
0.5 points below Flower's (null if none). ``--write-docs`` writes the plot and table to
``docs/results/frontier-TASK.{png,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmerge_bench.rounds import child, steady
from fedmerge_bench.timing import load_average, load_line

CLIENTS = 10
DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"
HALF_POINT = -0.5


def _both(
    density: float, values: str, down_density: float | None = None, down_values: str | None = None
) -> dict[str, Any]:
    return {
        "codec-density": density, "codec-values": values,
        "downlink-density": density if down_density is None else down_density,
        "downlink-values": values if down_values is None else down_values,
    }  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One codec setting of the frontier: its label, family (for the plot) and run-config keys."""

    label: str
    family: str
    codec: dict[str, Any]


STC = "fedmerge sign (STC)"
LOW_RANK = "fedmerge low-rank"
# every fedmerge point's packages are deflated when smaller (the apps' default, fedmerge.codec.container)
# except these: DGC's operating point as published, and one point that shows what deflate saves
NOT_DEFLATED: dict[str, Any] = {"codec-deflate": False, "downlink-deflate": False}


def _low_rank(rank: int, values: str, down_rank: int | None = None) -> dict[str, Any]:
    """Weight matrices as rank-``rank`` factor pairs up and rank-``down_rank`` pairs down (default: the
    same rank), the other tensors top-20 %, ``values``."""
    down = rank if down_rank is None else down_rank
    return {**_both(0.2, values), "codec-rank": rank, "downlink-rank": down}


POINTS: tuple[Point, ...] = (
    Point("top-20 % int4 both ways", "fedmerge int4", _both(0.2, "int4")),
    Point("STC: top-20 % sign both ways", STC, _both(0.2, "sign")),
    Point("STC: top-10 % sign both ways", STC, _both(0.1, "sign")),
    Point("STC: top-10 % sign up, top-20 % sign down", STC, _both(0.1, "sign", 0.2, "sign")),
    Point("STC: top-5 % sign both ways", STC, _both(0.05, "sign")),
    Point("STC: top-5 % sign up, top-20 % sign down", STC, _both(0.05, "sign", 0.2, "sign")),
    Point("STC: top-3 % sign both ways", STC, _both(0.03, "sign")),
    Point("low rank: rank 4, int4 both ways (biases top-20 %)", LOW_RANK, _low_rank(4, "int4")),
    Point("low rank: rank 8, int4 both ways (biases top-20 %)", LOW_RANK, _low_rank(8, "int4")),
    Point("low rank: rank 2, int4 both ways (biases top-20 %)", LOW_RANK, _low_rank(2, "int4")),
    Point("low rank: rank 8 up, rank 4 down, int4 (biases top-20 %)", LOW_RANK, _low_rank(8, "int4", 4)),
    Point("low rank: rank 8 up, rank 3 down, int4 (biases top-20 %)", LOW_RANK, _low_rank(8, "int4", 3)),
    Point("low rank: rank 6 up, rank 3 down, int4 (biases top-20 %)", LOW_RANK, _low_rank(6, "int4", 3)),
    # more bytes: where tiny_lm (Adam, 10 rounds) comes within a point of Flower (bench/RESULTS.md)
    Point("low rank: rank 16, int4 both ways (biases top-20 %)", LOW_RANK, _low_rank(16, "int4")),
    Point("top-50 % int4 both ways", "fedmerge int4", _both(0.5, "int4")),
    Point(
        "low rank: rank 8, int4 both ways, not deflated",
        LOW_RANK,
        {**_low_rank(8, "int4"), **NOT_DEFLATED},
    ),
    Point(
        "DGC point: top-1 % fp32 up, dense down",
        "DGC (uplink only)",
        {**_both(0.01, "fp32", 1.0, "fp32"), **NOT_DEFLATED},
    ),
)
QUICK_POINTS = (
    "top-20 % int4 both ways", "STC: top-20 % sign both ways", "STC: top-10 % sign both ways",
    "STC: top-5 % sign both ways", "low rank: rank 4, int4 both ways (biases top-20 %)",
    "low rank: rank 8, int4 both ways (biases top-20 %)",
    "low rank: rank 8 up, rank 4 down, int4 (biases top-20 %)",
)  # fmt: skip


def run_point(task: str, rounds: int, seed: int, point: Point | None) -> dict[str, Any]:
    """One federation: Flower's dense FedAvg when ``point`` is None, else fedmerge with its codec."""
    if point is None:
        return child("flower", CLIENTS, rounds, task, {"seed": seed})
    return child("fedmerge", CLIENTS, rounds, task, {"seed": seed, "codec": point.codec})


def summarise(
    points: list[Point], flower: dict[int, dict[str, Any]], ours: dict[tuple[str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per point: byte ratios (rounds 2…R and all rounds) and accuracy deltas per seed, in points."""
    seeds = sorted(flower)
    ref_steady = statistics.fmean(steady(flower[s]["bytes"]) for s in seeds)
    ref_all = statistics.fmean(statistics.fmean(flower[s]["bytes"]) for s in seeds)
    rows = []
    for p in points:
        runs = {s: ours[(p.label, s)] for s in seeds}
        deltas = [100 * (runs[s]["accuracy"][-1] - flower[s]["accuracy"][-1]) for s in seeds]
        rows.append({
            "label": p.label, "family": p.family, "codec": p.codec,
            "bytes_vs_flower": statistics.fmean(steady(r["bytes"]) for r in runs.values()) / ref_steady,
            "bytes_all_rounds_vs_flower":
                statistics.fmean(statistics.fmean(r["bytes"]) for r in runs.values()) / ref_all,
            "accuracy_delta_points": statistics.fmean(deltas),
            "accuracy_delta_points_per_seed": deltas,
            "accuracy": statistics.fmean(r["accuracy"][-1] for r in runs.values()),
        })  # fmt: skip
    return rows


def plot(path: Path, rows: list[dict[str, Any]], task: str, rounds: int, seeds: int) -> None:
    """Accuracy delta (mean, min–max over seeds) against bytes (log scale); Flower's dense at (1, 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"fedmerge int4": "s", STC: "o", LOW_RANK: "D", "DGC (uplink only)": "^"}
    for family, marker in markers.items():
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        xs = [r["bytes_vs_flower"] for r in mine]
        ys = [r["accuracy_delta_points"] for r in mine]
        lo = [y - min(r["accuracy_delta_points_per_seed"]) for y, r in zip(ys, mine, strict=True)]
        hi = [max(r["accuracy_delta_points_per_seed"]) - y for y, r in zip(ys, mine, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, capsize=3, label=family)
    ax.plot([1.0], [0.0], "k*", ms=12, label="Flower FedAvg, dense fp32")
    ax.axhspan(HALF_POINT, 100, color="green", alpha=0.07, label="within 0.5 points of Flower")
    ax.axvline(0.01, color="grey", ls=":", lw=1, label="1 % of Flower's bytes")
    ax.set_xscale("log")
    low = min(min(r["accuracy_delta_points_per_seed"]) for r in rows)
    high = max(max(r["accuracy_delta_points_per_seed"]) for r in rows)
    ax.set_ylim(min(low, HALF_POINT) - 1, max(high, 0.0) + 1)
    ax.set(
        xlabel="bytes per round, up + down, rounds 2…R (fraction of Flower's)",
        ylabel="final accuracy − Flower's (points)",
        title=f"{task}: {CLIENTS} clients, {rounds} rounds, {seeds} seeds (mean, min–max)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], task: str, rounds: int, seeds: list[int], command: str) -> str:
    lines = [
        f"# Accuracy against bytes: {task}",
        "",
        f"`{command}` — {CLIENTS} clients, {rounds} rounds, Dirichlet α = 0.5, seeds {seeds}; "
        "every point against Flower's FedAvg (dense fp32) on the same seeds. See `bench/frontier.py`.",
        "",
        f"![accuracy against bytes](frontier-{task}.png)",
        "",
        "| codec (both directions unless said) | bytes vs Flower, rounds 2…R | all rounds | "
        "accuracy − Flower's, points (mean) | per seed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{d:+.1f}" for d in r["accuracy_delta_points_per_seed"])
        lines.append(
            f"| {r['label']} | {r['bytes_vs_flower']:.4f} | {r['bytes_all_rounds_vs_flower']:.4f} | "
            f"{r['accuracy_delta_points']:+.2f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench frontier", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK_POINTS)} points, 10 rounds")
    ap.add_argument("--task", choices=("digits", "tiny_lm"), default="digits")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0…N-1 (default 3)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 20, quick 10)")
    ap.add_argument("--parallel", type=int, default=2, help="federations run at once (default 2)")
    ap.add_argument("--write-docs", action="store_true", help="write docs/results/frontier-TASK.{png,md}")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.parallel < 1:
        print("--seeds and --parallel must be at least 1", file=sys.stderr)
        return 2
    rounds = args.rounds or (10 if args.quick else 20)
    if rounds < 2:
        print("--rounds must be at least 2 (bytes are compared over rounds 2…R)", file=sys.stderr)
        return 2
    points = [p for p in POINTS if not args.quick or p.label in QUICK_POINTS]
    seeds = list(range(args.seeds))
    console = Console()
    console.log(load_line())
    jobs: list[tuple[int, Point | None]] = [(s, p) for s in seeds for p in (None, *points)]
    flower: dict[int, dict[str, Any]] = {}
    ours: dict[tuple[str, int], dict[str, Any]] = {}
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [(s, p, pool.submit(run_point, args.task, rounds, s, p)) for s, p in jobs]
        for s, p, future in futures:
            result = future.result()
            label = "Flower FedAvg" if p is None else p.label
            console.log(f"seed {s}, {label}: accuracy {result['accuracy'][-1]:.4f}, "
                        f"bytes (round 2) {result['bytes'][1]:,}")  # fmt: skip
            if p is None:
                flower[s] = result
            else:
                ours[(p.label, s)] = result
    rows = summarise(points, flower, ours)
    table = Table(title=f"{args.task}: {CLIENTS} clients, {rounds} rounds, seeds {seeds}")
    for col in ("codec", "bytes vs Flower (2…R)", "all rounds", "accuracy − Flower (pts)", "per seed"):
        table.add_column(col, justify="right")
    for r in rows:
        per_seed = " ".join(f"{d:+.1f}" for d in r["accuracy_delta_points_per_seed"])
        table.add_row(r["label"], f"{r['bytes_vs_flower']:.4f}", f"{r['bytes_all_rounds_vs_flower']:.4f}",
                      f"{r['accuracy_delta_points']:+.2f}", per_seed)  # fmt: skip
    console.print(table)
    flower_acc = statistics.fmean(flower[s]["accuracy"][-1] for s in seeds)
    console.print(f"Flower FedAvg final accuracy (mean over seeds): {flower_acc:.4f}; {load_line()}")
    if args.write_docs:
        command = "python -m bench frontier" + (" --quick" if args.quick else "") + f" --task {args.task}"
        command += f" --seeds {args.seeds}" if args.seeds != 3 else ""
        plot(DOCS / f"frontier-{args.task}.png", rows, args.task, rounds, len(seeds))
        (DOCS / f"frontier-{args.task}.md").write_text(markdown(rows, args.task, rounds, seeds, command))
        console.print(f"wrote {DOCS / f'frontier-{args.task}.png'} and .md")
    within = [r for r in rows if r["accuracy_delta_points"] >= HALF_POINT]
    best = min(within, key=lambda r: r["bytes_vs_flower"]) if within else None
    summary = {
        "task": args.task, "rounds": rounds, "seeds": len(seeds), "flower_accuracy": round(flower_acc, 4),
        "frontier": [
            {k: (round(v, 4) if isinstance(v, float) else
                 [round(x, 2) for x in v] if k == "accuracy_delta_points_per_seed" else v)
             for k, v in r.items() if k not in ("codec", "family")}
            for r in rows
        ],
        "smallest_bytes_within_half_point": round(best["bytes_vs_flower"], 4) if best else None,
        "smallest_bytes_within_half_point_codec": best["label"] if best else None,
        "load_average_1min": round(load_average()[0], 2),
    }  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
