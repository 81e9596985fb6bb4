"""Simulation throughput: client updates per minute of fedmerge's runner versus a plain Flower simulation.

    python -m bench simulate [--quick]

Both sides run on Flower's simulation engine in the same run, in separate processes, with the same
task (digits), partitions, local training and number of virtual clients (quick: 20 clients,
5 rounds; full: 100 clients, 5 rounds): fedmerge's ServerApp/ClientApp (top-20 % int4 task
vectors, streaming FedAvg, a committed version per round) versus ``flwr.serverapp.strategy.FedAvg``
with a quickstart-style dense ClientApp (see ``bench/rounds.py``, which runs both). Updates per
minute = clients per round × 60 / steady-state round time (rounds 2…R). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from fedmerge_bench.rounds import child, steady


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20 clients × 5 rounds")
    args = ap.parse_args(argv)
    clients, rounds = (20, 5) if args.quick else (100, 5)
    console = Console()
    ours = child("fedmerge", clients, rounds)
    ref = child("flower", clients, rounds)
    ours_upm = clients * 60 / steady(ours["round_s"])
    ref_upm = clients * 60 / steady(ref["round_s"])
    table = Table(title=f"client updates per minute, {clients} virtual clients on 2 CPU slots, digits")
    for col in ("runner", "s per round (2…R)", "updates / min", "final accuracy"):
        table.add_column(col, justify="right")
    table.add_row(
        "fedmerge", f"{steady(ours['round_s']):.3f}", f"{ours_upm:,.0f}", f"{ours['accuracy'][-1]:.3f}"
    )
    table.add_row(
        "Flower FedAvg", f"{steady(ref['round_s']):.3f}", f"{ref_upm:,.0f}", f"{ref['accuracy'][-1]:.3f}"
    )
    console.print(table)
    print(
        json.dumps(
            {
                "updates_per_min_vs_flower": round(ours_upm / ref_upm, 4),
                "fedmerge_updates_per_min": round(ours_upm, 1),
                "flower_updates_per_min": round(ref_upm, 1),
                "clients": clients,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
