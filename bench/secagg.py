"""Secure aggregation (SecAgg+) overhead: bytes and time per round against the plain legacy path.

    python -m bench secagg [--quick] [--engine simulation|inprocess]

Three legs on the *same* simulated SuperNodes, one after the other in one Flower simulation (Ray):
the same task (digits), partitions (Dirichlet α=0.5), local training (SGD, lr 0.1, 1 epoch), clients and
rounds, each leg starting from the same pre-trained base in its own store:

* **plain**: the legacy ``DefaultWorkflow`` without the SecAgg+ workflow and mod; clients send dense
  fp32 task vectors and the server averages them with fedmerge's ``fedavg``;
* **SecAgg+ FedAvg**: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)`` + ``secaggplus_mod``; clients
  submit (n_i/W)·τ_i and n_i/W masked, the server sees only the sum (fedmerge.privacy.secagg);
* **SecAgg+ TIES-as-sums**: clients submit the five per-coordinate TIES terms (5 × P values).

Bytes are the serialized size of every message of a round in each direction, counted by a Grid
wrapper as Flower 1.41 moves them between SuperLink and SuperNode: the sum of the deflated
inflatable objects of the message (message, record dict, records, arrays, 5 MiB array chunks),
HTTP framing and TLS excluded. SecAgg+ rounds have four request/reply stages (setup, key shares,
masked vectors, unmask) and every one is counted. Round time runs from ``configure_fit`` to the end of
``aggregate_fit`` (commit included, counting excluded); means are over rounds 2…R (round 1 starts the
clients). ``max_abs_error_vs_plain`` is max |SecAgg+ FedAvg − fedavg(the same client deltas)| over all
rounds, the deltas retrained here from each round's committed parent version (seeded, one thread).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SEED, ALPHA, LR, EPOCHS = 0, 0.5, 0.1, 1


def _replay_error(store: Path, reports: list[Any], cfg: Any) -> float:
    """max |committed − fedmerge aggregate of the retrained client deltas| over the rounds of one leg."""
    from fedmerge.aggregators import merge
    from fedmerge.store import ModelStore
    from fedmerge.tasks import get_task
    from fedmerge.tasks.local_round import local_round
    from fedmerge.tasks.partitions import partition_for
    from fedmerge.tasks.training import torch_threads

    task = get_task(cfg.task)
    parts = partition_for(cfg.task, cfg.num_clients, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)
    name, params = cfg.method()
    worst = 0.0
    with ModelStore.open(store) as st, torch_threads(1):
        for report in reports:
            base = st.materialize(report.parent_id)
            deltas = [
                local_round(
                    task, base, data, seed=cfg.seed, round_=report.round, epochs=cfg.local_epochs, lr=cfg.lr,
                    batch_size=cfg.batch_size,
                ).delta
                for data in parts
            ]  # fmt: skip
            plain = merge(
                name, deltas, [d.num_examples for d in parts], seed=cfg.seed, round=report.round, **params
            )
            secure = st.load_delta(report.version_id)
            worst = max(worst, max(float((secure[k] - plain[k]).abs().max()) for k in plain))
    return worst


def _steady(values: list[float]) -> float:
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench secagg", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4 clients × 3 rounds (about a minute)")
    ap.add_argument("--engine", choices=("simulation", "inprocess"), default="simulation")
    args = ap.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))
    from fedmerge.privacy.secagg import SecAggConfig
    from fedmerge_simulations.secagg import run_legs

    clients, rounds = (4, 3) if args.quick else (8, 5)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "num-clients": clients, "num-rounds": rounds, "seed": SEED, "dirichlet-alpha": ALPHA, "lr": LR,
            "local-epochs": EPOCHS, "server-eval": True,
        }  # fmt: skip
        legs: dict[str, dict[str, Any]] = {
            "plain FedAvg (dense fp32)": {**common, "secure": False, "mode": "fedavg"},
            "SecAgg+ FedAvg": {**common, "secure": True, "mode": "fedavg"},
            "SecAgg+ TIES-as-sums": {**common, "secure": True, "mode": "ties", "ties-density": 0.2},
        }
        for i, leg in enumerate(legs.values()):
            leg["store"] = str(Path(tmp) / f"store{i}")
        t0 = time.perf_counter()
        results = dict(zip(legs, run_legs(list(legs.values()), engine=args.engine), strict=True))
        console.log(
            f"{len(legs)} legs × {rounds} rounds × {clients} clients in {time.perf_counter() - t0:.1f} s"
        )
        plain, secure, ties = results.values()
        cfg_secure = SecAggConfig.from_mapping(legs["SecAgg+ FedAvg"])
        cfg_ties = SecAggConfig.from_mapping(legs["SecAgg+ TIES-as-sums"])
        error = _replay_error(Path(legs["SecAgg+ FedAvg"]["store"]), secure, cfg_secure)
        ties_error = _replay_error(Path(legs["SecAgg+ TIES-as-sums"]["store"]), ties, cfg_ties)

    def per_round(reports: list[Any], key: str) -> float:
        return statistics.fmean(getattr(r, key) for r in reports)

    table = Table(
        title=f"digits, {clients} clients, {rounds} rounds, engine={args.engine}, same nodes, same run"
    )
    table.add_column("")
    for name in legs:
        table.add_column(name, justify="right")
    table.add_column("SecAgg+ / plain", justify="right")
    rows = [
        ("client→server bytes / round", "uplink_bytes"),
        ("server→client bytes / round", "downlink_bytes"),
        ("messages / round", "messages"),
    ]
    for label, key in rows:
        values = [per_round(r, key) for r in results.values()]
        table.add_row(label, *(f"{v:,.0f}" for v in values), f"{values[1] / values[0]:.3f}")
    totals = [per_round(r, "uplink_bytes") + per_round(r, "downlink_bytes") for r in results.values()]
    table.add_row("total bytes / round", *(f"{v:,.0f}" for v in totals), f"{totals[1] / totals[0]:.3f}")
    times = [_steady([r.wall_s for r in reps]) for reps in results.values()]
    table.add_row("round time, s (rounds 2…R)", *(f"{v:.3f}" for v in times), f"{times[1] / times[0]:.3f}")
    accs = [reps[-1].metrics.get("server-accuracy", float("nan")) for reps in results.values()]
    table.add_row("final accuracy", *(f"{v:.4f}" for v in accs), "")
    console.print(table)
    bound = max(r.error_bound for r in secure)
    console.print(
        f"SecAgg+ FedAvg: max |secure − plain fedavg of the same deltas| = {error:.3g} "
        f"(bound m·Δ·W/Σn = {bound:.3g}); TIES-as-sums vs fedmerge ties: {ties_error:.3g} "
        f"(bound {max(r.error_bound for r in ties):.3g}, "
        f"near-tie coordinates {sum(r.ambiguous_coordinates for r in ties)})"
    )
    up = [per_round(r, "uplink_bytes") for r in results.values()]
    summary = {
        "secagg_bytes_overhead": totals[1] / totals[0],
        "secagg_time_overhead": times[1] / times[0],
        "ties_as_sums_bytes_vs_fedavg": up[2] / up[1],
        "max_abs_error_vs_plain": error,
        "secagg_uplink_overhead": up[1] / up[0],
        "secagg_downlink_overhead": per_round(secure, "downlink_bytes") / per_round(plain, "downlink_bytes"),
        "ties_as_sums_total_bytes_vs_fedavg": totals[2] / totals[1],
        "ties_time_vs_secagg_fedavg": times[2] / times[1],
        "error_bound": bound,
        "ties_max_abs_error_vs_plain": ties_error,
        "clients": clients,
        "rounds": rounds,
        "engine": args.engine,
    }
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
