"""Where a simulated round's time goes, by phase, and the accuracy at each codec.

    python -m bench simulate_profile [--clients 20 100] [--rounds 3] [--accuracy]

The simulate benchmark's configuration (``bench/rounds.py``: digits, Dirichlet α = 0.5, the same
local training) run by :func:`fedmerge_server.app.run_server` on an in-process grid of fedmerge's
ClientApp (``fedmerge_simulations.secagg.InProcessGrid``: a protobuf round trip per message, each node
with its own persistent ``Context``, no Ray), so every phase of a round is attributed in one process:
cProfile over rounds 2…R, cumulative milliseconds per round and per client update of the ClientApp's
``train`` (local training, base handling, encoding with error feedback) and of the server's phases
(building messages, judging replies, commit + evaluation). Torch runs on one thread, as a Ray worker
does. Timings are only proportions under other load (the load average is printed).

``--accuracy``: the final server accuracy and the bytes per round of the benchmark's codec
(``bench/rounds.py``'s ``CODEC``, top-20 % sign up and down with error feedback) against the codec
that sends Flower's bytes (every entry fp32 up, full weights down), which is Flower FedAvg's exchange.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
from typing import Any

from fedmerge_bench.rounds import ALPHA, CLIENT_WORK, CODEC, SEED, WORKLOADS
from fedmerge_bench.timing import load_average

DENSE: dict[str, Any] = {
    "codec-density": 1.0, "codec-values": "fp32", "codec-deflate": False, "downlink-density": 1.0,
}  # fmt: skip
# (label, path fragment, function name): cumulative time of these functions
PHASES: list[tuple[str, str, str]] = [
    ("ClientApp train (all)", "clients/app.py", "train_reply"),
    ("… local training (local_round)", "fedmerge/tasks/local_round.py", "local_round"),
    ("… base handling (resolve_base)", "fedmerge/flower/client/reply.py", "resolve_base"),
    ("… … compressed downlink", "fedmerge/flower/client/reply.py", "apply_downlink_update"),
    ("… encoding + error feedback (encode_reply)", "fedmerge/flower/client/reply.py", "encode_reply"),
    ("… … codec (encode_package)", "fedmerge/codec/package.py", "encode_package"),
    ("server: building messages", "fedmerge/flower/server/", "build_messages"),
    ("server: judging replies", "fedmerge/flower/server/", "judge"),
    ("server: commit + evaluation", "fedmerge/flower/server/", "commit_round"),
    ("protobuf round trips", "simulations/secagg.py", "_wire"),
]  # fmt: skip


def run(clients: int, rounds: int, codec: dict[str, Any], profile: cProfile.Profile | None) -> list[Any]:
    """The benchmark's fedmerge run on an in-process grid; ``profile`` enabled from round 2 on."""
    import torch
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedmerge.flower.config import parse_run_config
    from fedmerge.plugins import load_object
    from fedmerge_simulations.secagg import InProcessGrid

    app = load_object("fedmerge_clients.app:app", "ClientApp")  # by import string, as Flower loads apps
    run_server = load_object("fedmerge_server.app:run_server", "server runner")

    torch.set_num_threads(1)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, SUPERLINK_NODE_ID, 1
    lr, epochs = WORKLOADS["digits"]
    reports: list[Any] = []
    with tempfile.TemporaryDirectory() as store:
        config = {
            "store": store, "num-rounds": rounds, "min-clients": clients, "min-valid": clients,
            "aggregator": "fedavg", **codec, "task": "digits", "lr": lr, "local-epochs": epochs,
            "dirichlet-alpha": ALPHA, "seed": SEED, "wait-for-nodes-s": 0.0, **CLIENT_WORK,
        }  # fmt: skip
        grid = InProcessGrid(app, clients)
        for context in grid.contexts.values():  # as flwr run delivers it to every ClientApp
            context.run_config = dict(config)

        def on_round(report: Any) -> None:
            reports.append(report)
            if len(reports) == 1 and profile is not None:
                profile.enable()

        run_server(grid, parse_run_config(config), on_round)
        if profile is not None:
            profile.disable()
    return reports


def phases(profile: cProfile.Profile, clients: int, rounds: int) -> dict[str, float]:
    """Milliseconds per round of each :data:`PHASES` entry (cumulative, rounds 2…R)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, fragment, name in PHASES:
        total = sum(entry[3] for (path, _, func), entry in stats.items() if func == name and fragment in path)
        out[label] = 1e3 * total / max(rounds - 1, 1)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simulate_profile", description=__doc__)
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (profiled: 2…R)")
    ap.add_argument("--accuracy", action="store_true", help="final accuracy: benchmark codec vs dense fp32")
    args = ap.parse_args(argv)
    summary: dict[str, Any] = {}
    for clients in args.clients:
        if args.accuracy:
            for name, codec in (("codec", CODEC), ("dense", DENSE)):
                reports = run(clients, args.rounds, codec, None)
                acc = reports[-1].metrics.get("server-accuracy", float("nan"))
                later = reports[1:] or reports
                per_round = sum(r.uplink_bytes + r.downlink_bytes for r in later) / len(later)
                print(f"{clients} clients, {name}: final accuracy {acc:.4f}, {per_round:,.0f} B/round (2…R)")
                summary[f"accuracy_{name}_{clients}"] = round(float(acc), 4)
                summary[f"bytes_per_round_{name}_{clients}"] = round(per_round)
            continue
        profile = cProfile.Profile()
        run(clients, args.rounds, CODEC, profile)
        print(f"{clients} clients, {args.rounds} rounds (profiled 2…{args.rounds}):")
        print(f"  {'phase':<52} {'ms per round':>12} {'ms per update':>14}")
        for label, ms in phases(profile, clients, args.rounds).items():
            print(f"  {label:<52} {ms:>12.1f} {ms / clients:>14.2f}")
            summary[f"{label} [{clients}] ms_per_update"] = round(ms / clients, 3)
    summary["load_average_1min"] = round(load_average()[0], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
