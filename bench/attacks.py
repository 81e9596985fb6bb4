"""``python -m bench attacks [--quick]``: accuracy and backdoor success of every aggregator / defence under
each attack at 20 % malicious clients on the digits task, against the clean run of the same defence
measured in the same invocation. The last line printed is one JSON object.

--quick: 10 clients × 3 rounds (about 15 s on 2 cores); default: 20 clients × 5 rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from fedmerge_simulations.attack_report import summarise, summary_json
from fedmerge_simulations.attacks import AttackConfig, run_grid


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench attacks")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    cfg = AttackConfig(malicious_fraction=args.fraction)
    if args.quick:
        cfg = replace(cfg, num_clients=10, rounds=3)
    t0 = time.perf_counter()
    results = run_grid(cfg)
    summary = summarise(results)
    table = Table(title=f"accuracy % (backdoor success %), {args.fraction:.0%} malicious; Δ vs clean run")
    table.add_column("attack")
    for d in cfg.defences:
        table.add_column(d, justify="right")
    best: dict[str, dict[str, float | str]] = {}
    for a in cfg.attacks:
        cells = []
        for d in cfg.defences:
            s, clean = summary[(args.fraction, a, d)], summary[(args.fraction, "none", d)]
            delta = 100 * (s["accuracy"] - clean["accuracy"])
            cells.append(f"{100 * s['accuracy']:.1f} ({100 * s['backdoor_success']:.0f}) {delta:+.1f}")
        table.add_row(a, *cells)
        top = max(cfg.defences, key=lambda d: summary[(args.fraction, a, d)]["accuracy"])
        best[a] = {"defence": top, "accuracy": summary[(args.fraction, a, top)]["accuracy"]}
    Console().print(table)
    clean_fedavg = summary[(args.fraction, "none", "fedavg")]["accuracy"]
    print(
        json.dumps(
            {
                "benchmark": "attacks",
                "quick": args.quick,
                "malicious_fraction": args.fraction,
                "num_clients": cfg.num_clients,
                "rounds": cfg.rounds,
                "clean_fedavg_accuracy": clean_fedavg,
                "best_defence": best,
                "results": summary_json(summary),
                "wall_s": time.perf_counter() - t0,
            }
        )
    )
    return 0
