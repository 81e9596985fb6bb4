"""The attack report: run the attack × defence grid (``simulations.attacks``) over malicious fractions and
seeds, and write ``results.json``, ``results.csv``, ``accuracy.png``, ``backdoor.png`` and ``table.md``
(mean over seeds) into an output directory.

    python -m simulations.attack_report --out results/attacks            # fractions 0.1 0.2 0.3, 3 seeds
    python -m simulations.attack_report --out results/attacks --quick    # fraction 0.2, 1 seed
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedmerge_simulations.attacks import AttackConfig, AttackResult, run_grid

Key = tuple[float, str, str]  # (malicious fraction, attack, defence)


def run_report(base: AttackConfig, fractions: Sequence[float], seeds: Sequence[int]) -> list[AttackResult]:
    """Every (fraction, seed) grid; the clean ``none`` attack runs once per seed (fraction-independent)."""
    results: list[AttackResult] = []
    for seed in seeds:
        clean = run_grid(replace(base, seed=seed, malicious_fraction=0.0), attacks=["none"])
        for fraction in fractions:
            results.extend(replace(r, malicious_fraction=fraction) for r in clean)
            cfg = replace(base, seed=seed, malicious_fraction=fraction)
            results.extend(run_grid(cfg, attacks=[a for a in cfg.attacks if a != "none"]))
    return results


def summarise(results: Sequence[AttackResult]) -> dict[Key, dict[str, float]]:
    """(fraction, attack, defence) → mean accuracy / backdoor success over seeds, and the seed count."""
    groups: dict[Key, list[AttackResult]] = defaultdict(list)
    for r in results:
        groups[(r.malicious_fraction, r.attack, r.defence)].append(r)
    return {
        key: {
            "accuracy": statistics.fmean(r.accuracy for r in rs),
            "backdoor_success": statistics.fmean(r.backdoor_success for r in rs),
            "seeds": float(len(rs)),
        }
        for key, rs in groups.items()
    }


def markdown_table(summary: dict[Key, dict[str, float]], metric: str) -> str:
    """One table per fraction: rows = attacks, columns = defences, cells = ``metric`` in % (mean)."""
    out = []
    for fraction in sorted({k[0] for k in summary}):
        attacks = list(dict.fromkeys(k[1] for k in summary if k[0] == fraction))
        defences = list(dict.fromkeys(k[2] for k in summary if k[0] == fraction))
        out.append(f"**{metric.replace('_', ' ')} (%), {fraction:.0%} malicious clients**\n")
        out.append("| attack | " + " | ".join(defences) + " |")
        out.append("|---|" + "---:|" * len(defences))
        for a in attacks:
            cells = [f"{100 * summary[(fraction, a, d)][metric]:.1f}" for d in defences]
            out.append(f"| {a} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(summary: dict[Key, dict[str, float]], metric: str, path: Path) -> None:
    """A heat map per fraction: attack × defence, cell = ``metric`` in %."""
    fractions = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(1, len(fractions), figsize=(6.5 * len(fractions), 4.2), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        attacks = list(dict.fromkeys(k[1] for k in summary if k[0] == fraction))
        defences = list(dict.fromkeys(k[2] for k in summary if k[0] == fraction))
        grid = np.array([[100 * summary[(fraction, a, d)][metric] for d in defences] for a in attacks])
        im = ax.imshow(grid, cmap="viridis" if metric == "accuracy" else "magma", vmin=0, vmax=100)
        ax.set_xticks(range(len(defences)), defences, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        for i in range(len(attacks)):
            for j in range(len(defences)):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(f"{metric.replace('_', ' ')} (%), {fraction:.0%} malicious", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Sequence[AttackResult], out: Path, command: str) -> dict[Key, dict[str, float]]:
    """Write every artefact into ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.as_dict() for r in results]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with (out / "results.csv").open("w", newline="") as fh:
        cols = ["malicious_fraction", "attack", "defence", "seed", "accuracy", "backdoor_success",
                "rejected_malicious", "rejected_honest", "wall_s"]  # fmt: skip
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(results)
    plot(summary, "accuracy", out / "accuracy.png")
    plot(summary, "backdoor_success", out / "backdoor.png")
    seeds = sorted({r.seed for r in results})
    text = [
        f"Command: `{command}` (mean over seeds {seeds}).\n",
        markdown_table(summary, "accuracy"),
        markdown_table(summary, "backdoor_success"),
    ]
    (out / "table.md").write_text("\n".join(text))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.attack_report", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/attacks"))
    parser.add_argument("--quick", action="store_true", help="fraction 0.2 and one seed")
    parser.add_argument("--fractions", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    fractions = args.fractions or ([0.2] if args.quick else [0.1, 0.2, 0.3])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    results = run_report(AttackConfig(), fractions, seeds)
    command = "python -m simulations.attack_report " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(results, args.out, command.strip())
    print((args.out / "table.md").read_text())
    return 0


def summary_json(summary: dict[Key, dict[str, float]]) -> dict[str, Any]:
    """{"0.2/sign_flip/median": {"accuracy": ..., "backdoor_success": ...}, ...}."""
    return {f"{f:g}/{a}/{d}": v for (f, a, d), v in summary.items()}


if __name__ == "__main__":
    sys.exit(main())
