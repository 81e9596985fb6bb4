"""``python -m bench load``'s round: one fedmerge round over many simulated SuperNodes against Flower's
built-in ``FedAvg`` over the same clients (see :mod:`fedmerge_bench.load`'s docstring, "Round").

The fedmerge side runs in a child process of its own (``python -m bench._load_round CLIENTS STORE``,
one JSON line), so its peak RSS is the ServerApp and simulation driver alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]


def fedmerge_round(clients: int, store: Path) -> dict[str, Any]:
    """One fedmerge round over ``clients`` simulated SuperNodes (same task/training as bench/rounds.py)."""
    from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app
    from fedmerge_bench.rounds import ALPHA, SEED, WORKLOADS, peak_rss_bytes

    LR, EPOCHS = WORKLOADS["digits"]
    from fedmerge.flower.server.commit import RoundReport
    from fedmerge.store import ModelStore

    reports: list[RoundReport] = []
    config = {
        "store": str(store), "num-rounds": 1, "min-clients": clients, "min-valid": 1, "max-retries": 0,
        "aggregator": "fedavg", "codec-density": 0.1, "codec-values": "int8", "lr": LR,
        "local-epochs": EPOCHS, "dirichlet-alpha": ALPHA, "seed": SEED, "downlink-density": 0.1,
        "round-deadline-s": 900.0, "wait-for-nodes-s": 300.0,
    }  # fmt: skip
    t0 = time.perf_counter()
    run_simulation_app(
        ServerAppFactory("fedmerge_server.app:make_server_app"),
        "fedmerge_clients.app:app",
        num_supernodes=clients,
        run_config=config,
        on_report=reports.append,
    )
    simulation_s = time.perf_counter() - t0
    if not reports:
        raise RuntimeError("the fedmerge ServerApp ran no round (see the Flower log above)")
    report = reports[-1]
    with ModelStore.open(store) as st:
        latest = st.get("latest")
        in_manifest = sum(c.accepted for c in latest.contributors)
        listed = len(latest.contributors)
        ok = st.verify().ok and latest.id == report.version_id and latest.round == 1
    return {
        "round_s": report.wall_s,
        "simulation_s": simulation_s,
        "accepted": len(report.accepted),
        "rejected": [f"{o.client_id}: {o.reason}" for o in report.rejected][:10],
        "version": report.version_id,
        "manifest_accepted": in_manifest,
        "manifest_contributors": listed,
        "store_ok": ok,
        "accuracy": report.metrics.get("server-accuracy", float("nan")),
        "peak_rss": peak_rss_bytes(),
    }


def _round_child(clients: int, work: Path) -> dict[str, Any]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench._load_round", str(clients), str(work / "round-store")],
        capture_output=True, text=True, env=env, check=False, cwd=ROOT,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fedmerge round failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def run_round(clients: int, work: Path, console: Console | None = None) -> dict[str, Any]:
    """The fedmerge round and the Flower FedAvg reference (``bench.rounds.child``), same run."""
    from fedmerge_bench.rounds import child

    say = console.log if console is not None else (lambda *a, **k: None)
    os.environ.setdefault("FLWR_HOME", str(work / "flwr-home"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    say(f"fedmerge round over {clients} simulated SuperNodes")
    t0 = time.perf_counter()
    ours = _round_child(clients, work)
    ours["total_s"] = time.perf_counter() - t0
    say(f"Flower FedAvg round over {clients} simulated SuperNodes")
    t0 = time.perf_counter()
    ref = child("flower", clients, 1)
    ref["total_s"] = time.perf_counter() - t0
    return {"fedmerge": ours, "flower": ref}


if __name__ == "__main__":
    print(json.dumps(fedmerge_round(int(sys.argv[1]), Path(sys.argv[2]))))
