"""Multi-task model merging benchmark: ``python -m bench merging [--quick]``.

A miniature, offline version of the 8-task CLIP-ViT merging benchmark (Ilharco et al. 2023; Yadav et
al. 2023; Marczak et al. 2025). Everything is built locally from scikit-learn's digits (no download).

* **Base.** A shared MLP body pre-trained for a generic objective none of the tasks is (its
  pre-training head is discarded): by default (``--pretrain broad``) a 1024-wide body pre-trained on a
  tenth of the images in every task's view, so that the experts share a representation and their
  task vectors are small and redundant, as real fine-tunes are; ``--pretrain upright`` is the earlier
  128-wide body pre-trained on upright digits only (``merging_suite.py`` documents both).
* **Tasks** (``TASKS``; 8 by default, ≥ 6 in ``--quick``): each sees the 8×8 images through its own
  input transformation and some through a different label map, so the experts pull the shared body in
  conflicting directions: rotations by 90° and 180°, a left-right mirror, inverted intensities, half
  and all of the pixels permuted, an up-down mirror labelled by parity (2 classes), and a 270° rotation
  of the inverted image labelled by the digit mod 3 (3 classes).
* **Experts.** Each task's head is fixed and kept per task: the base's own digit classifier read
  through the task's label map (class c = the mean of the weights of the digits d with d mod C = c) —
  the analogue of CLIP's zero-shot text head. The whole body is fine-tuned on the task with that head
  frozen (as Ilharco et al. fine-tune CLIP's image encoder with the text head frozen), so every expert
  must map its transformed inputs back into the same feature space. Merging acts on the body only;
  every merged body is evaluated with each task's own head, as in the CLIP benchmark.
* **LoRA experts** (unless ``--no-lora``): the same tasks fine-tuned with real peft LoRA (rank 8, α = 16,
  on both body layers, biases frozen, Adam at 1e-2), each turned into a task vector in product space,
  ΔW = (α/r)·B·A from peft's ``get_delta_weight``. Every method merges them as it merges the full
  experts (same grid, chosen on validation) into a second table, normalised by the LoRA experts'
  own accuracies.
* **Merges.** Every registered aggregator that merges N models merges the N task vectors
  τ_t = θ_t − θ_base, once at its paper default and over a small grid (``grid``), with unit weights.
  The grid value is chosen per seed on a validation split (as the papers choose λ on validation data)
  and reported on the test split ("tuned"). Skipped: methods whose ``exact_models`` is fixed (slerp:
  two models) and the Byzantine-robust aggregators (``ROBUST``): they discard or down-weight deltas
  that disagree with the majority, which in multi-task merging is every task's own update.

Measured, per method and per seed: test accuracy on every task, the average, and the normalised
accuracy (merged accuracy ÷ the expert's accuracy on its task, averaged over tasks), mean ± std over
seeds; the CPU time of the merge itself on the benchmark's experts; and, on a synthetic model of
``--cost-layers`` linear layers side×side with N task vectors (so that memory is visible above the
allocator's noise), the CPU time and peak RSS growth of one merge (the kernel's high-water mark
reset just before it, large blocks mmapped so frees return to the OS).

Writes ``merging.png`` and ``merging.json`` into ``--out`` (default ``docs/results/merging/``),
prints tables and, last, one JSON line: each method's mean tuned normalised accuracy, ``best_method``,
``published_order_reproduced`` (Iso-C and TSV-M > TIES > task arithmetic > average, each strictly),
``iso_c_minus_ties``, ``ties_minus_task_arithmetic`` and ``task_arithmetic_minus_average``
(average = ``fedavg``; null where a method is missing), and under ``lora`` the same accuracies for the
LoRA experts with ``lora_best_method``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedmerge.aggregators import available, create, get
from fedmerge.aggregators.core_space import core_space_matrix
from fedmerge.aggregators.knots import knots_matrix
from fedmerge.memory import use_mmap_for_large_allocations
from fedmerge_bench.merging_suite import TASKS, UPRIGHT, Config, Suite, build_suite
from fedmerge_simulations.continual_digits import generator

# Byzantine-robust aggregators: they select, clip or median-filter deltas against the majority, which
# in multi-task merging removes exactly the task-specific updates the merge should keep.
ROBUST = {"krum", "multi_krum", "median", "trimmed_mean", "robust_ties", "norm_bounded"}

# Grids (besides each method's default). Methods that *sum* task vectors need λ < 1 with N experts;
# methods that average, select or re-normalise them need λ around 1 (the grid brackets both).
SUM_GRID = (0.1, 0.2, 0.3, 0.5, 1.0)
MEAN_GRID = (0.25, 0.5, 1.0, 1.5, 2.0)
GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "task_arithmetic": ("scaling", SUM_GRID),
    "dare_linear": ("scaling", SUM_GRID),
    "della_linear": ("scaling", SUM_GRID),
    "breadcrumbs": ("scaling", SUM_GRID),
    "magmax": ("scaling", (0.25, 0.5, 1.0, 1.5)),
    "ties": ("scaling", MEAN_GRID),
    "dare_ties": ("scaling", MEAN_GRID),
    "della": ("scaling", MEAN_GRID),
    "breadcrumbs_ties": ("scaling", MEAN_GRID),
    "model_stock": ("scaling", MEAN_GRID),
    "multislerp": ("scaling", MEAN_GRID),
    "iso_c": ("scaling", (0.25, 0.5, 1.0, 1.5)),
    "iso_cts": ("scaling", (0.25, 0.5, 1.0, 1.5)),
    "tsv_m": ("scaling", (0.25, 0.5, 1.0, 1.5)),
    "karcher": ("scaling", MEAN_GRID),
}


# ---------------------------------------------------------------------- methods
def methods() -> tuple[list[str], dict[str, str]]:
    """(methods merged, {skipped method: reason}) over the registry."""
    chosen, skipped = [], {}
    for name in sorted(available()):
        cls = get(name)
        fixed = getattr(cls, "exact_models", None)
        if fixed is not None:
            skipped[name] = f"merges exactly {fixed} models"
        elif name in ROBUST:
            skipped[name] = (
                "Byzantine-robust: discards or down-weights the disagreeing (task-specific) deltas"
            )
        else:
            chosen.append(name)
    return chosen, skipped


def configs(name: str, with_grid: bool) -> list[dict[str, Any]]:
    """The default ({}) first, then the grid values that differ from it."""
    out: list[dict[str, Any]] = [{}]
    if with_grid and name in GRID:
        param, values = GRID[name]
        default = getattr(create(name), param, None)
        out += [{param: v} for v in values if default is None or not math.isclose(v, float(default))]
    return out


# merges of the LoRA experts in their own space (adapter-level, fedmerge.aggregators.knots/core_space):
# "SPACE+METHOD" runs METHOD (a registered aggregator, with its grid) on the aligned components
LORA_SPACE = ("knots+ties", "knots+dare_ties", "core+ties", "core+iso_c", "core+tsv_m")


def merge_in_lora_space(
    name: str,
    deltas: Sequence[Mapping[str, torch.Tensor]],
    factors: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    params: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """``SPACE+METHOD`` on the LoRA experts: per adapted weight, KnOTS (one SVD of the concatenated
    ΔW_i, METHOD on the aligned Σ·V_i) or Core Space (METHOD on the cores U_Bᵀ ΔW_i V_Aᵀ), the merged
    ΔW = B'·A'; the other tensors (biases, which LoRA does not train) are zero."""
    space, method = name.split("+", 1)
    out = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    ones = [1.0] * len(deltas)
    for key in factors[0]:
        if space == "knots":
            b, a = knots_matrix([d[key] for d in deltas], ones, method, **params)
        else:
            b, a = core_space_matrix([f[key] for f in factors], ones, method, **params)
        out[key] = b @ a
    return out


def merge_once(
    name: str,
    deltas: Sequence[Mapping[str, torch.Tensor]],
    params: Mapping[str, Any],
    seed: int,
    fishers: Sequence[Mapping[str, torch.Tensor]] | None = None,
    factors: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """The merged task vector and the CPU seconds the merge took (begin, adds, finalize). ``fishers``:
    each expert's diagonal Fisher, passed to the ``fisher`` method (which without them is fedavg);
    ``factors``: the LoRA experts' (A, s·B) per weight, for the ``SPACE+METHOD`` merges."""
    t0 = time.process_time()
    if "+" in name:
        assert factors is not None, f"{name} merges LoRA factors"
        merged = merge_in_lora_space(name, deltas, factors, {"seed": seed, **params})
        return merged, time.process_time() - t0
    agg = create(name, seed=seed, **params)
    agg.begin({k: tuple(v.shape) for k, v in deltas[0].items()})
    for i, d in enumerate(deltas):
        if name == "fisher" and fishers is not None:
            agg.add(d, 1.0, client_id=i, fisher=fishers[i])  # type: ignore[call-arg]
        else:
            agg.add(d, 1.0, client_id=i)
    out = agg.finalize()
    return out, time.process_time() - t0


def evaluate_methods(
    suite: Suite,
    experts: Sequence[Mapping[str, torch.Tensor]],
    expert_val: Sequence[float],
    expert_test: Sequence[float],
    grids: Mapping[str, list[dict[str, Any]]],
    res: dict[str, dict[str, list[Any]]],
    errors: dict[str, str],
    seed: int,
    fishers: Sequence[Mapping[str, torch.Tensor]] | None = None,
    factors: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> None:
    """Merge ``experts`` with every method of ``grids`` (default, then its grid); record in ``res`` the
    default's and the validation-chosen config's normalised test accuracy (÷ ``expert_test``), per-task
    accuracies, the chosen config and the default's merge CPU seconds. A method that raises is recorded
    in ``errors`` and not run again."""
    merge_once("fedavg", experts, {}, seed)  # warm-up: first-use costs of torch kernels
    for m in grids:
        if m in errors:
            continue
        best: tuple[float, dict[str, Any], list[float]] | None = None
        try:
            for i, params in enumerate(grids[m]):
                delta, secs = merge_once(m, experts, params, seed, fishers, factors)
                val = normalised(suite.accuracies(delta, "val"), expert_val)
                test = suite.accuracies(delta, "test")
                if i == 0:
                    res[m]["default"].append(normalised(test, expert_test))
                    res[m]["default_tasks"].append(test)
                    res[m]["seconds"].append(secs)
                if best is None or val > best[0]:
                    best = (val, params, test)
        except Exception as exc:  # a method that fails is reported, not fatal
            errors[m] = f"{type(exc).__name__}: {exc}"
            continue
        assert best is not None
        res[m]["tuned"].append(normalised(best[2], expert_test))
        res[m]["tuned_tasks"].append(best[2])
        res[m]["chosen"].append(best[1] or "default")


def normalised(accs: Sequence[float], experts: Sequence[float]) -> float:
    return statistics.fmean(a / e if e > 0 else 0.0 for a, e in zip(accs, experts, strict=True))


# ---------------------------------------------------------------------- cost on a synthetic model
def _hwm_kib() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+)", text)
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synthetic_experts(n: int, layers: int, side: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """N task vectors of low-rank-plus-noise side×side weights and biases (as fine-tuning gives)."""
    out = []
    for i in range(n):
        g = generator(seed, 200, i)
        d: dict[str, torch.Tensor] = {}
        for k in range(layers):
            a = torch.randn(side, 16, generator=g) @ torch.randn(16, side, generator=g) / 16
            d[f"layers.{k}.weight"] = 1e-2 * (a + 0.1 * torch.randn(side, side, generator=g))
            d[f"layers.{k}.bias"] = 1e-3 * torch.randn(side, generator=g)
        out.append(d)
    return out


def cost(names: list[str], n: int, layers: int, side: int, repeats: int, seed: int) -> dict[str, Any]:
    """Per method: least CPU seconds of ``repeats`` merges and peak RSS growth (MiB) of one merge."""
    deltas = synthetic_experts(n, layers, side, seed)
    input_mib = sum(v.numel() * v.element_size() for d in deltas for v in d.values()) / 2**20
    out: dict[str, Any] = {"input_mib": input_mib, "tasks": n, "layers": layers, "side": side, "methods": {}}
    merge_once("fedavg", deltas, {}, seed)  # warm-up (first-use allocations of torch kernels)
    for name in names:
        times = []
        for _ in range(repeats):
            times.append(merge_once(name, deltas, {}, seed)[1])
        gc.collect()
        peak = None
        if _reset_hwm():
            before = _hwm_kib()
            result, _ = merge_once(name, deltas, {}, seed)
            after = _hwm_kib()
            del result
            if before is not None and after is not None:
                peak = (after - before) / 1024
        out["methods"][name] = {"seconds": min(times), "peak_rss_mib": peak}
    return out


# ---------------------------------------------------------------------- output
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def plot(
    path: Path,
    names: list[str],
    tuned: dict[str, list[float]],
    default: dict[str, list[float]],
    per_task: dict[str, list[float]],
    task_names: list[str],
    base: float,
) -> None:
    """Bars of normalised accuracy (default and tuned, mean ± std over seeds) and a per-task heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(names, key=lambda m: -statistics.fmean(tuned[m]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})
    xs = range(len(order))
    for off, (label, data) in zip(
        (-0.2, 0.2), (("default", default), ("tuned on validation", tuned)), strict=True
    ):
        means = [100 * statistics.fmean(data[m]) for m in order]
        stds = [100 * (statistics.pstdev(data[m]) if len(data[m]) > 1 else 0.0) for m in order]
        ax1.bar([x + off for x in xs], means, 0.4, yerr=stds, capsize=2, label=label)
    ax1.axhline(100, color="k", lw=0.8, ls="--")
    ax1.axhline(100 * base, color="grey", lw=0.8, ls=":", label="base (no merge)")
    ax1.set_xticks(list(xs), order, rotation=60, ha="right", fontsize=8)
    ax1.set(
        ylabel="normalised accuracy (% of expert)",
        title=f"Merging {len(task_names)} digits experts (mean ± std)",
    )
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    mat = [[100 * a for a in per_task[m]] for m in order]
    im = ax2.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax2.set_yticks(list(xs), order, fontsize=7)
    ax2.set_xticks(range(len(task_names)), task_names, rotation=60, ha="right", fontsize=7)
    ax2.set_title("test accuracy per task, tuned (%)")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


PUBLISHED_ORDER = (("iso_c", "tsv_m"), ("ties",), ("task_arithmetic",), ("fedavg",))


def published_order(score: Mapping[str, float]) -> bool | None:
    """Whether the mean tuned normalised accuracies follow the published ordering — Iso-C and TSV-M above
    TIES above task arithmetic above the simple average (ViT-B/32, 8 tasks: 86.3 / 85.9 > 75.1 > 70.8 >
    ≈ 66) — every member of a rank strictly above every member of the next; None if one is missing."""
    if any(m not in score for rank in PUBLISHED_ORDER for m in rank):
        return None
    return all(
        min(score[m] for m in upper) > max(score[m] for m in lower)
        for upper, lower in itertools.pairwise(PUBLISHED_ORDER)
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench merging", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 seeds, shorter training (≈ 1–3 min on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3 quick, 5 full)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--tasks", type=int, default=len(TASKS), help=f"number of tasks (2…{len(TASKS)})")
    p.add_argument(
        "--pretrain",
        choices=("broad", "upright"),
        default="broad",
        help="the base's pre-training (merging_suite.py): broad (default) or the earlier upright miniature",
    )
    p.add_argument("--hidden", type=int, default=None, help="body width (broad 1024, upright 128)")
    p.add_argument("--epochs-scale", type=float, default=None, help="multiply training epochs (quick 0.5)")
    p.add_argument("--no-grid", action="store_true", help="defaults only")
    p.add_argument("--no-lora", action="store_true", help="full fine-tuned experts only (no LoRA experts)")
    p.add_argument("--cost-side", type=int, default=None, help="synthetic layer side (0: skip cost part)")
    p.add_argument("--cost-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    p.add_argument("--out", type=Path, default=Path("docs/results/merging"))
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not 2 <= args.tasks <= len(TASKS):
        raise SystemExit(f"--tasks must be in 2…{len(TASKS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    t_start = time.perf_counter()
    use_mmap_for_large_allocations(1 << 16)
    scale = args.epochs_scale if args.epochs_scale is not None else (0.5 if args.quick else 1.0)
    base_cfg = Config() if args.pretrain == "broad" else UPRIGHT
    cfg = dataclasses.replace(
        base_cfg,
        tasks=args.tasks,
        hidden=args.hidden or base_cfg.hidden,
        pretrain_epochs=max(1, round(base_cfg.pretrain_epochs * scale)),
        finetune_epochs=max(1, round(base_cfg.finetune_epochs * scale)),
        lora=not args.no_lora,
    )
    n_seeds = args.seeds or (3 if args.quick else 5)
    seeds = [args.seed + i for i in range(n_seeds)]
    names, skipped = methods()
    grids = {m: configs(m, not args.no_grid) for m in names}

    # per method and seed: default / tuned normalised accuracy, per-task test accuracies, chosen config
    res: dict[str, dict[str, list[Any]]] = {
        m: {"default": [], "tuned": [], "default_tasks": [], "tuned_tasks": [], "chosen": [], "seconds": []}
        for m in names
    }
    errors: dict[str, str] = {}
    ref: dict[str, list[list[float]]] = {"expert": [], "base": []}
    lora_names = [*names, *LORA_SPACE]
    lora_grids = {**grids, **{m: configs(m.split("+", 1)[1], not args.no_grid) for m in LORA_SPACE}}
    lora_res: dict[str, dict[str, list[Any]]] = {m: {k: [] for k in res["fedavg"]} for m in lora_names}
    lora_errors: dict[str, str] = {}
    lora_ref: dict[str, list[list[float]]] = {"expert": [], "base": []}
    build_s = 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        suite = build_suite(cfg, seed)
        build_s += time.perf_counter() - t0
        ref["expert"].append(suite.expert_test)
        ref["base"].append(suite.base_test)
        evaluate_methods(
            suite, suite.experts, suite.expert_val, suite.expert_test, grids, res, errors, seed, suite.fishers
        )
        if cfg.lora:
            lora_ref["expert"].append(suite.lora_test)
            lora_ref["base"].append(suite.base_test)
            lora = (suite.lora_experts, suite.lora_val, suite.lora_test)
            evaluate_methods(
                suite, *lora, lora_grids, lora_res, lora_errors, seed, suite.lora_fishers, suite.lora_factors
            )
    ok = [m for m in names if m not in errors]
    lora_ok = [m for m in lora_names if m not in lora_errors] if cfg.lora else []
    accuracy_s = time.perf_counter() - t_start

    cost_side = args.cost_side if args.cost_side is not None else (256 if args.quick else 512)
    cost_res = (
        cost(ok, args.tasks, args.cost_layers, cost_side, 1 if args.quick else 3, args.seed)
        if cost_side > 0
        else None
    )

    T = args.tasks
    task_names = [s.name for s in TASKS[:T]]
    mean_tasks = {m: [statistics.fmean(s[t] for s in res[m]["tuned_tasks"]) for t in range(T)] for m in ok}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(
        args.out / "merging.png",
        ok,
        {m: res[m]["tuned"] for m in ok},
        {m: res[m]["default"] for m in ok},
        mean_tasks,
        task_names,
        statistics.fmean(normalised(b, e) for b, e in zip(ref["base"], ref["expert"], strict=True)),
    )

    console = Console(width=160)
    fed_s = min(res["fedavg"]["seconds"]) if "fedavg" in ok else None
    table = Table(
        title=f"Multi-task merging, {T} digits tasks, {n_seeds} seeds (normalised accuracy, "
        "% of each expert; mean ± std over seeds)"
    )
    for col in (
        "method",
        "default",
        "tuned",
        "tuned avg acc",
        "chosen (per seed)",
        "merge ms",
        "÷ fedavg",
        "synthetic s",
        "peak RSS MiB",
    ):
        table.add_column(col, justify="left" if col in ("method", "chosen (per seed)") else "right")
    ranked = sorted(ok, key=lambda m: -statistics.fmean(res[m]["tuned"]))
    for m in ranked:
        d_m, d_s = mean_std(res[m]["default"])
        t_m, t_s = mean_std(res[m]["tuned"])
        avg_acc = mean_std([statistics.fmean(x) for x in res[m]["tuned_tasks"]])
        secs = min(res[m]["seconds"])
        chosen = ",".join(
            "d" if c == "default" else "/".join(f"{v:g}" for v in c.values()) for c in res[m]["chosen"]
        )
        c = cost_res["methods"][m] if cost_res else None
        table.add_row(
            m,
            f"{100 * d_m:.1f} ± {100 * d_s:.1f}",
            f"{100 * t_m:.1f} ± {100 * t_s:.1f}",
            f"{100 * avg_acc[0]:.1f} ± {100 * avg_acc[1]:.1f}",
            chosen,
            f"{1000 * secs:.1f}",
            f"{secs / fed_s:.1f}" if fed_s else "",
            f"{c['seconds']:.3f}" if c else "",
            f"{c['peak_rss_mib']:.1f}" if c and c["peak_rss_mib"] is not None else "",
        )
    for label in ("expert", "base"):
        per = [statistics.fmean(s) for s in ref[label]]
        norm = [normalised(s, e) for s, e in zip(ref[label], ref["expert"], strict=True)]
        n_m, n_s = mean_std(norm)
        a_m, a_s = mean_std(per)
        table.add_row(
            f"({label})",
            "",
            f"{100 * n_m:.1f} ± {100 * n_s:.1f}",
            f"{100 * a_m:.1f} ± {100 * a_s:.1f}",
            *[""] * 5,
        )
    console.print(table)
    task_table = Table(title="Test accuracy per task, tuned merge (%, mean over seeds)")
    task_table.add_column("method")
    for tn in task_names:
        task_table.add_column(tn, justify="right")
    for m in ranked:
        task_table.add_row(m, *(f"{100 * a:.1f}" for a in mean_tasks[m]))
    for label in ("expert", "base"):
        task_table.add_row(
            f"({label})", *(f"{100 * statistics.fmean(s[t] for s in ref[label]):.1f}" for t in range(T))
        )
    console.print(task_table)
    if cfg.lora:
        lora_table = Table(
            title=f"LoRA experts (peft, r={cfg.lora_rank}, α={cfg.lora_alpha:g}, product space "
            f"ΔW = (α/r)·B·A), {T} tasks, {n_seeds} seeds "
            "(normalised accuracy, % of each LoRA expert; mean ± std)"
        )
        for col in ("method", "default", "tuned", "tuned avg acc", "chosen (per seed)", "merge ms"):
            lora_table.add_column(col, justify="left" if col in ("method", "chosen (per seed)") else "right")
        for m in sorted(lora_ok, key=lambda m: -statistics.fmean(lora_res[m]["tuned"])):
            d_m, d_s = mean_std(lora_res[m]["default"])
            t_m, t_s = mean_std(lora_res[m]["tuned"])
            avg_acc = mean_std([statistics.fmean(x) for x in lora_res[m]["tuned_tasks"]])
            chosen = ",".join(
                "d" if c == "default" else "/".join(f"{v:g}" for v in c.values())
                for c in lora_res[m]["chosen"]
            )
            lora_table.add_row(
                m,
                f"{100 * d_m:.1f} ± {100 * d_s:.1f}",
                f"{100 * t_m:.1f} ± {100 * t_s:.1f}",
                f"{100 * avg_acc[0]:.1f} ± {100 * avg_acc[1]:.1f}",
                chosen,
                f"{1000 * min(lora_res[m]['seconds']):.1f}",
            )
        for label in ("expert", "base"):
            norm = [normalised(s, e) for s, e in zip(lora_ref[label], lora_ref["expert"], strict=True)]
            per = [statistics.fmean(s) for s in lora_ref[label]]
            (n_m, n_s), (a_m, a_s) = mean_std(norm), mean_std(per)
            lora_table.add_row(
                f"({label})",
                "",
                f"{100 * n_m:.1f} ± {100 * n_s:.1f}",
                f"{100 * a_m:.1f} ± {100 * a_s:.1f}",
                "",
                "",
            )
        console.print(lora_table)
        if lora_errors:
            console.print(
                "[red]failed on LoRA experts:[/red] " + "; ".join(f"{k}: {v}" for k, v in lora_errors.items())
            )
    if skipped:
        console.print("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    if errors:
        console.print("[red]failed:[/red] " + "; ".join(f"{k}: {v}" for k, v in errors.items()))

    score = {m: statistics.fmean(res[m]["tuned"]) for m in ok}

    def diff(a: str, b: str) -> float | None:
        return round(score[a] - score[b], 4) if a in score and b in score else None

    seconds = time.perf_counter() - t_start
    record = {
        "config": {
            **vars(cfg),
            "seeds": seeds,
            "quick": args.quick,
            "threads": args.threads,
            "grid": {m: g for m, g in grids.items()},
        },
        "tasks": task_names,
        "skipped": skipped,
        "errors": errors,
        "reference": ref,
        "results": {m: res[m] for m in ok},
        "lora": {"reference": lora_ref, "errors": lora_errors, "results": {m: lora_res[m] for m in lora_ok}},
        "cost": cost_res,
        "phase_seconds": {"build_experts": build_s, "accuracy_total": accuracy_s, "total": seconds},
    }
    (args.out / "merging.json").write_text(json.dumps(record, indent=1, default=str))
    summary: dict[str, Any] = {m: round(score[m], 4) for m in names if m in score}
    summary.update({m: None for m in errors})
    lora_score = {m: statistics.fmean(lora_res[m]["tuned"]) for m in lora_ok}
    summary.update(
        {
            "best_method": max(score, key=lambda m: score[m]) if score else None,
            "published_order_reproduced": published_order(score),
            "lora_best_method": max(lora_score, key=lambda m: lora_score[m]) if lora_score else None,
            "pretrain": cfg.pretrain,
            "iso_c_minus_ties": diff("iso_c", "ties"),
            "ties_minus_task_arithmetic": diff("ties", "task_arithmetic"),
            "task_arithmetic_minus_average": diff("task_arithmetic", "fedavg"),
            "default": {m: round(statistics.fmean(res[m]["default"]), 4) for m in ok},
            "base": round(
                statistics.fmean(normalised(s, e) for s, e in zip(ref["base"], ref["expert"], strict=True)), 4
            ),
            "expert_accuracy": round(statistics.fmean(statistics.fmean(s) for s in ref["expert"]), 4),
            "lora": {m: round(statistics.fmean(lora_res[m]["tuned"]), 4) for m in lora_ok},
            "lora_expert_accuracy": (
                round(statistics.fmean(statistics.fmean(s) for s in lora_ref["expert"]), 4)
                if cfg.lora
                else None
            ),
            "tasks": T,
            "seeds": n_seeds,
            "seconds": round(seconds, 1),
        }
    )
    print(json.dumps(summary))
    return 0
