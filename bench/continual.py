"""Continual merging benchmark: ``python -m bench continual [--quick]``.

Part 1, accuracy. The permuted-digits stream of :mod:`simulations.continual_digits` (T tasks, a
shared pre-trained MLP, one fully fine-tuned expert per task). Experts arrive one at a time in
several random orders; after each arrival every continual merger's current model is evaluated on
all tasks seen so far: average accuracy and backward transfer
BWT_k = mean_{i<k} (A_{k,i} − A_{i,i}) (A_{k,i}: accuracy on the i-th arrived task after k arrivals).
References measured in the same run: each expert on its own task (upper bound) and the base (lower
bound), averaged over the tasks seen so far.

Part 2, cost. On a synthetic model of 4 linear layers 512×512 (task vectors drawn from a seeded
generator), the time to merge one more expert after 2, 8 and 32 experts (best of repeats, state
restored before each; CPU seconds of this process with ``--threads 1``, so other load on the
machine does not inflate them) and the size of the merger's state. ``merge_time_growth_2_to_32`` is OPCM's
time after 32 ÷ after 2 (≈ 1 when the cost does not depend on the history).

Writes ``continual_digits.png`` and ``continual.json`` into ``--results`` (default
``results/continual/``), prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedmerge.aggregators.continual import ContinualMerger, create_continual
from fedmerge.aggregators.continual.opcm import project_out
from fedmerge_simulations.continual_digits import DigitsStream, StreamConfig, build_stream

METHODS = ["opcm", "continual_task_arithmetic", "continual_ties", "magmax", "running_average"]
TIMING_AFTER = (2, 8, 32)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench continual", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 orders, fewer timing repeats (about a minute)")
    p.add_argument("--tasks", type=int, default=8, help="number of tasks T (≥ 2)")
    p.add_argument("--orders", type=int, default=None, help="random task orders (default 3 quick, 5 full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    p.add_argument("--results", type=Path, default=Path("results/continual"))
    p.add_argument("--layer", type=int, default=512, help="side of the synthetic linear layers")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- part 1: accuracy
def task_orders(num_tasks: int, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 12345)
    return [torch.randperm(num_tasks, generator=g).tolist() for _ in range(count)]


def run_order(
    stream: DigitsStream, merger: ContinualMerger, order: list[int]
) -> tuple[list[float], list[float]]:
    """Average accuracy over seen tasks and BWT after each arrival."""
    diag: list[float] = []  # A_{i,i}
    avg, bwt = [], []
    for k, task in enumerate(order):
        merged = merger.add_expert(stream.experts[task])
        accs = [stream.accuracy_with(merged, t) for t in order[: k + 1]]
        diag.append(accs[-1])
        avg.append(sum(accs) / len(accs))
        bwt.append(sum(a - d for a, d in zip(accs[:-1], diag[:-1], strict=True)) / k if k else 0.0)
    return avg, bwt


def reference_curve(per_task: list[float], order: list[int]) -> list[float]:
    return [sum(per_task[t] for t in order[: k + 1]) / (k + 1) for k in range(len(order))]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0


# ---------------------------------------------------------------------- part 2: cost
def synthetic_expert(index: int, layers: int, side: int, seed: int) -> dict[str, torch.Tensor]:
    """A task vector of ``layers`` side×side weights and biases, low-rank plus noise (like fine-tuning)."""
    g = torch.Generator().manual_seed(seed * 7919 + index)
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        a = torch.randn(side, 16, generator=g) @ torch.randn(16, side, generator=g) / 16
        out[f"layers.{i}.weight"] = 1e-2 * (a + 0.1 * torch.randn(side, side, generator=g))
        out[f"layers.{i}.bias"] = 1e-3 * torch.randn(side, generator=g)
    return out


def time_merges(name: str, side: int, repeats: int, seed: int) -> dict[str, Any]:
    """CPU seconds to add one more expert after n ∈ TIMING_AFTER experts, and the state size in bytes.

    The states after each n are kept and the measurements interleaved (n₁, n₂, n₃, n₁, ...), so a
    change of load on the machine during the run affects every n alike; the least time of each wins.
    """
    merger = create_continual(name)
    states: dict[int, dict[str, torch.Tensor]] = {}
    for n in range(1, max(TIMING_AFTER) + 1):
        merger.add_expert(synthetic_expert(n, 4, side, seed))
        if n in TIMING_AFTER:
            states[n] = merger.state_dict()
    nxt = {n: synthetic_expert(10_000 + n, 4, side, seed) for n in TIMING_AFTER}
    runs: dict[int, list[float]] = {n: [] for n in TIMING_AFTER}
    for r in range(repeats + 1):  # round 0 warms caches and JIT kernels up and is dropped
        for n in TIMING_AFTER:
            merger.load_state_dict(states[n])
            t0 = time.process_time()
            merger.add_expert(nxt[n])
            if r:
                runs[n].append(time.process_time() - t0)
    seconds = {n: min(v) for n, v in runs.items()}
    state_bytes = {n: sum(t.numel() * t.element_size() for t in st.values()) for n, st in states.items()}
    first, last = TIMING_AFTER[0], TIMING_AFTER[-1]
    return {"seconds": seconds, "state_bytes": state_bytes, "growth": seconds[last] / seconds[first]}


def svd_share(sides: list[int], repeats: int) -> dict[int, float]:
    """Share of one OPCM linear-weight merge spent in the projection (SVD + products), per layer side."""
    out = {}
    g = torch.Generator().manual_seed(1)
    for side in sides:
        prev, new = torch.randn(side, side, generator=g), torch.randn(side, side, generator=g)

        def proj(p: torch.Tensor = prev, n: torch.Tensor = new) -> None:
            project_out(p, n, 0.5)

        def add(p: torch.Tensor = prev, n: torch.Tensor = new) -> None:
            (p * 1.3 + n).div_(1.1)

        t_proj, t_add = best_of(proj, repeats), best_of(add, repeats)
        out[side] = t_proj / (t_proj + t_add)
    return out


def best_of(fn: Callable[[], None], repeats: int) -> float:
    """Least CPU time of ``repeats`` calls."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


# ---------------------------------------------------------------------- output
def plot(path: Path, curves: dict[str, list[list[float]]], bwts: dict[str, list[list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in curves.items():
        t = torch.tensor(runs)
        x = list(range(1, t.shape[1] + 1))
        mean, std = t.mean(0), t.std(0, unbiased=False)
        style = "--" if label in ("experts (upper bound)", "base (lower bound)") else "-"
        ax1.plot(x, mean, style, marker="o", ms=3, label=label)
        ax1.fill_between(x, mean - std, mean + std, alpha=0.15)
        if label in bwts:
            b = torch.tensor(bwts[label])
            ax2.plot(x, b.mean(0), marker="o", ms=3, label=label)
    ax1.set(xlabel="experts merged", ylabel="average accuracy over seen tasks", title="Permuted digits")
    ax2.set(xlabel="experts merged", ylabel="backward transfer", title="Backward transfer")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.tasks < 2:
        raise SystemExit("--tasks must be ≥ 2")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    orders_n = args.orders or (3 if args.quick else 5)
    repeats = 5 if args.quick else 9
    phases: dict[str, float] = {}
    t_start = time.perf_counter()

    stream = build_stream(StreamConfig(num_tasks=args.tasks, seed=args.seed, permuted_fraction=0.5))
    T = args.tasks
    expert_acc = [stream.accuracy_with(stream.experts[t], t) for t in range(T)]
    base_acc = [stream.accuracy(stream.base, t) for t in range(T)]
    orders = task_orders(T, orders_n, args.seed)
    phases["build_stream"] = time.perf_counter() - t_start

    curves: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    bwts: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    for name in METHODS:
        for order in orders:
            avg, bwt = run_order(stream, create_continual(name), order)
            curves[name].append(avg)
            bwts[name].append(bwt)
    curves["experts (upper bound)"] = [reference_curve(expert_acc, o) for o in orders]
    curves["base (lower bound)"] = [reference_curve(base_acc, o) for o in orders]

    phases["accuracy"] = time.perf_counter() - t_start - sum(phases.values())
    timing = {name: time_merges(name, args.layer, repeats, args.seed) for name in METHODS}
    shares = svd_share([128, 256, 512] if args.quick else [128, 256, 512, 1024, 2048], 3)

    phases["timing"] = time.perf_counter() - t_start - sum(phases.values())
    args.results.mkdir(parents=True, exist_ok=True)
    plot(args.results / "continual_digits.png", curves, bwts)

    table = Table(
        title=f"Continual merging, permuted digits: T={T}, {orders_n} orders (mean ± std over orders)"
    )
    for col in (
        "method",
        "final avg acc",
        "final BWT",
        "merge s after 2",
        "after 8",
        "after 32",
        "32÷2",
        "state MiB",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    final: dict[str, float] = {}
    for name in METHODS:
        acc_m, acc_s = mean_std([c[-1] for c in curves[name]])
        bwt_m, bwt_s = mean_std([b[-1] for b in bwts[name]])
        final[name] = acc_m
        tm = timing[name]
        table.add_row(
            name,
            f"{100 * acc_m:.1f} ± {100 * acc_s:.1f}",
            f"{100 * bwt_m:+.1f} ± {100 * bwt_s:.1f}",
            *(f"{tm['seconds'][n]:.4f}" for n in TIMING_AFTER),
            f"{tm['growth']:.2f}",
            f"{tm['state_bytes'][TIMING_AFTER[-1]] / 2**20:.2f}",
        )
    for label in ("experts (upper bound)", "base (lower bound)"):
        m, s = mean_std([c[-1] for c in curves[label]])
        table.add_row(label, f"{100 * m:.1f} ± {100 * s:.1f}", *[""] * (len(TIMING_AFTER) + 3))
    console.print(table)
    share_table = Table(title="OPCM: share of a linear-weight merge spent in the SVD projection")
    share_table.add_column("layer")
    share_table.add_column("projection share", justify="right")
    for side, share in shares.items():
        share_table.add_row(f"{side}×{side}", f"{100 * share:.1f}%")
    console.print(share_table)

    record = {
        "config": {
            "tasks": T,
            "orders": orders,
            "seed": args.seed,
            "threads": args.threads,
            "quick": args.quick,
        },
        "curves": curves,
        "bwt": bwts,
        "expert_accuracy": expert_acc,
        "base_accuracy": base_acc,
        "timing": {
            k: {**v, "seconds": {str(n): s for n, s in v["seconds"].items()}} for k, v in timing.items()
        },
        "svd_share": {str(k): v for k, v in shares.items()},
        "phase_seconds": phases,
    }
    (args.results / "continual.json").write_text(json.dumps(record, indent=1))
    summary = {
        **{name: round(final[name], 4) for name in METHODS},
        "experts": round(statistics.fmean(expert_acc), 4),
        "base": round(statistics.fmean(base_acc), 4),
        "merge_time_growth_2_to_32": round(timing["opcm"]["growth"], 3),
        "orders": orders_n,
        "tasks": T,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0
