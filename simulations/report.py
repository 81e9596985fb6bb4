"""Reports of an experiment: CSV/JSON metrics, PNG plots and a Markdown summary (mean ± std over seeds).

Input: the trial results the runner wrote, one JSON object per trial::

    {"key": ..., "aggregator": "ties", "codec": "top10-int8", "seed": 0, "wall_s": 12.3,
     "rounds": [{"round": 1, "accuracy": 0.71, "loss": 0.9, "bytes_sent": 12345, "dense_bytes": 345678,
                 "wall_s": 2.1, "accepted": 10, "rejected": 0, "client_accuracy": [0.6, 0.8, ...]}, ...]}
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

Result = dict[str, Any]


def method_of(result: Result) -> str:
    return f"{result['aggregator']} / {result['codec']}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_by_method(results: Sequence[Result]) -> dict[str, list[Result]]:
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in sorted(results, key=lambda r: (method_of(r), r["seed"])):
        groups[method_of(r)].append(r)
    return dict(groups)


def summary_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per method: final accuracy, bytes per round and wall time per round, mean ± std over seeds."""
    rows = []
    for method, runs in group_by_method(results).items():
        final = [r["rounds"][-1]["accuracy"] for r in runs if r["rounds"]]
        sent = [statistics.fmean(x["bytes_sent"] for x in r["rounds"]) for r in runs if r["rounds"]]
        dense = [statistics.fmean(x["dense_bytes"] for x in r["rounds"]) for r in runs if r["rounds"]]
        wall = [statistics.fmean(x["wall_s"] for x in r["rounds"]) for r in runs if r["rounds"]]
        acc_m, acc_s = _mean_std(final)
        rows.append(
            {
                "method": method,
                "seeds": len(runs),
                "final_accuracy_mean": acc_m,
                "final_accuracy_std": acc_s,
                "bytes_per_round": statistics.fmean(sent) if sent else float("nan"),
                "bytes_vs_dense": statistics.fmean(sent) / statistics.fmean(dense) if dense else float("nan"),
                "wall_s_per_round": statistics.fmean(wall) if wall else float("nan"),
            }
        )
    return sorted(rows, key=lambda r: -r["final_accuracy_mean"])


def markdown_summary(results: Sequence[Result], *, title: str, baseline: float | None = None) -> str:
    rows = summary_rows(results)
    lines = [
        f"# {title}",
        "",
        "| method (aggregator / codec) | seeds | final accuracy (mean ± std) | bytes per round "
        "| vs dense fp32 | s per round |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {100 * r['final_accuracy_mean']:.1f} ± "
            f"{100 * r['final_accuracy_std']:.1f} | {r['bytes_per_round'] / 1e3:,.1f} kB | "
            f"{100 * r['bytes_vs_dense']:.1f}% | {r['wall_s_per_round']:.2f} |"
        )
    lines.append("")
    if baseline is not None:
        lines.append(f"Base model before any round: {100 * baseline:.1f}% accuracy.")
    if len(rows) >= 2:
        best, second = rows[0], rows[1]
        gap = 100 * (best["final_accuracy_mean"] - second["final_accuracy_mean"])
        spread = 100 * max(best["final_accuracy_std"], second["final_accuracy_std"])
        if min(best["seeds"], second["seeds"]) < 2:
            verdict = "one seed only, so no statement of significance is possible"
        elif gap > 2 * spread:
            verdict = "a clear margin"
        else:
            verdict = "within the seed-to-seed spread (not significant)"
        lines.append(
            f"**{best['method']}** has the highest final accuracy, {gap:.1f} points above "
            f"**{second['method']}** — {verdict}."
        )
    return "\n".join(lines) + "\n"


def write_csv(results: Sequence[Result], path: Path) -> None:
    fields = ["method", "aggregator", "codec", "seed", "round", "accuracy", "loss"]
    fields += ["bytes_sent", "dense_bytes", "wall_s", "accepted", "rejected"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            for x in r["rounds"]:
                writer.writerow(
                    {
                        "method": method_of(r),
                        "aggregator": r["aggregator"],
                        "codec": r["codec"],
                        "seed": r["seed"],
                        **{k: x.get(k) for k in fields[4:]},
                    }
                )


def plot_accuracy_vs_round(results: Sequence[Result], path: Path, baseline: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="base model (round 0)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for method, runs in group_by_method(results).items():
        n = min(len(r["rounds"]) for r in runs)
        rounds = [runs[0]["rounds"][i]["round"] for i in range(n)]
        per_round = [[r["rounds"][i]["accuracy"] for r in runs] for i in range(n)]
        mean = [statistics.fmean(v) for v in per_round]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_round]
        (line,) = ax.plot(rounds, mean, marker="o", label=method)
        ax.fill_between(
            rounds,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            alpha=0.2,
            color=line.get_color(),
        )
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title("Accuracy per round (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_bytes(results: Sequence[Result], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in group_by_method(results).items():
        n = min(len(r["rounds"]) for r in runs)
        cum = [
            statistics.fmean(sum(r["rounds"][j]["bytes_sent"] for j in range(i + 1)) for r in runs)
            for i in range(n)
        ]
        acc = [statistics.fmean(r["rounds"][i]["accuracy"] for r in runs) for i in range(n)]
        ax.plot([c / 1e6 for c in cum], acc, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative client upload (MB, log scale)")
    ax.set_ylabel("global test accuracy")
    ax.set_title("Accuracy versus bytes sent")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_client_spread(results: Sequence[Result], path: Path) -> None:
    groups = group_by_method(results)
    data = [
        [a for r in runs if r["rounds"] for a in r["rounds"][-1].get("client_accuracy", [])]
        for runs in groups.values()
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4.5))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("per-client test accuracy after the last round")
    ax.set_title("Spread of accuracy across clients (all seeds)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    results: Sequence[Result], out_dir: Path, *, title: str, baseline: float | None = None
) -> Path:
    """Write results.json, metrics.csv, three PNG plots and summary.md into ``out_dir``; return summary.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(list(results), indent=1))
    write_csv(results, out_dir / "metrics.csv")
    plot_accuracy_vs_round(results, out_dir / "accuracy_vs_round.png", baseline)
    plot_accuracy_vs_bytes(results, out_dir / "accuracy_vs_bytes.png")
    plot_client_spread(results, out_dir / "client_spread.png")
    summary = out_dir / "summary.md"
    body = markdown_summary(results, title=title, baseline=baseline)
    body += "\n![accuracy per round](accuracy_vs_round.png)\n![accuracy vs bytes](accuracy_vs_bytes.png)\n"
    body += "![client spread](client_spread.png)\n"
    summary.write_text(body)
    return summary
