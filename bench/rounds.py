"""fedmerge rounds versus Flower's built-in FedAvg strategy on the same simulation.

    python -m bench rounds [--quick] [--task digits|tiny_lm]

Same task (``--task``: digits, or the tiny causal transformer), same non-IID partitions (Dirichlet
α=0.5), same local training (the task's optimizer; lr and epochs in ``WORKLOADS``), same number of clients
and rounds, both on Flower's simulation engine in the same run:

* **fedmerge**: the fedmerge ServerApp/ClientApp — clients send task vectors whose weight matrices
  travel as rank-8 factor pairs (the truncated SVD) with int4 values and the biases top-20 % int4, the
  server folds them as they arrive (FedAvg semantics), commits a version per round and sends clients
  that hold the previous version the update instead of weights, its weight matrices as rank-4 pairs
  (``CODEC``; both directions with error feedback); the nodes hold the base already
  (``downlink-base-at-nodes``: each builds its task's pretrained base, used only when its weights
  digest is the one the server names), so round 1 sends no weights;
* **Flower FedAvg**: ``flwr.serverapp.strategy.FedAvg`` with a quickstart-style ClientApp that
  receives and returns dense fp32 weights.

Each side runs in its own process, so its peak RSS (the process holding the ServerApp and the
simulation driver) is its own. Bytes are counted from the payloads actually exchanged (uplink +
downlink). Round time and bytes are means over rounds 2…R (round 1 includes the clients' start-up,
and Flower's round 1 ships the base weights to every client; the all-rounds byte ratio is printed too).
The two sides run ``--repeats`` times each, interleaved (fedmerge, Flower, Flower, fedmerge, …, as
``bench.timing.interleaved`` orders calls); each side's round time is the best over its runs of the
mean over rounds 2…R, and accuracy, bytes and RSS come from that best run. The load average is printed.
``server_rss_growth_10_to_50`` is fedmerge's peak RSS with 50 clients ÷ with 10 (one round each).

Bytes counting round 1 are ``bytes_all_rounds_vs_flower_fedavg`` (also printed under its former name,
``bytes_vs_flower_fedavg_all_rounds``); ``bytes_all_rounds_base_sent_vs_flower_fedavg`` counts the base's
dense fp32 weights to every client in round 1 as well (what a federation whose nodes do not hold the
base sends: ``downlink-base-at-nodes = false``).
The worked LoRA example (``examples/hf_lora``, three nodes, its shipped run config: compressed uplink
and downlink) runs once against the dense LoRA exchange of the same rounds (``bench/_lora_example.py``
says what that is): ``lora_bytes_vs_dense_lora`` (up + down, the base's one shipment apart) with both
final losses (``--no-lora`` skips it).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmerge.flower.simulation import emit_report, run_simulation_app
from fedmerge.plugins import load_object
from fedmerge_bench import _lora_example
from fedmerge_bench.timing import interleaved, load_average, load_line

ALPHA, SEED = 0.5, 0
# task → (lr, local epochs): the same local training on both sides (digits: SGD; tiny_lm: Adam, the
# task's local optimizer). Both built-in tasks are small (a client update takes ~5 ms on digits' MLP,
# ~30 ms on tiny_lm's 90 k-parameter transformer), so round times measure fixed per-round costs,
# Flower's 0.1 s polling ticks included. tiny_lm's lr was 0.05 until 2026-12-07: Adam at that rate
# left both sides at chance (1/16 on the answer tokens, loss ln 16) and every tiny_lm comparison before
# then measured noise; at 0.003 Flower's FedAvg reaches 0.64 after 10 rounds (bench/RESULTS.md)
WORKLOADS: dict[str, tuple[float, int]] = {"digits": (0.1, 2), "tiny_lm": (0.003, 1)}
# fedmerge's codec: the smallest point of `python -m bench frontier` (digits, 10 clients, 20 rounds)
# within 0.5 points of Flower's final accuracy pooled over every run of it (15 seed runs, -0.26): the
# weight matrices as rank-8 factor pairs up and rank-4 pairs down, int4 values, the biases top-20 %
# int4, packages deflated — 2.1 % of Flower's bytes, where rank 8 both ways took 2.6 % and top-20 %
# sign 3.3 %. Rank 4 both ways (1.7 %) is within the half point in one run of four, -0.55 pooled
# (bench/RESULTS.md, "Rank 8 up, rank 4 down")
CODEC: dict[str, Any] = {
    "codec-rank": 8, "codec-density": 0.2, "codec-values": "int4",
    "downlink-rank": 4, "downlink-density": 0.2, "downlink-values": "int4",
    "downlink-base-at-nodes": True,
}  # fmt: skip
# the same work per update as Flower's quickstart-style client below: train and reply (no evaluation of
# the local test split inside train; the server evaluates each round on both sides)
CLIENT_WORK: dict[str, Any] = {"client-test-metrics": False}


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def client_device(gpu_fraction: float) -> str:
    """The device a virtual client of either side trains on: ``cuda`` when it is given a fraction of a
    GPU, else ``cpu``."""
    return "cuda" if gpu_fraction > 0 else "cpu"


def run_fedmerge(
    clients: int,
    rounds: int,
    task: str = "digits",
    codec: dict[str, Any] | None = None,
    seed: int = SEED,
    gpu_fraction: float = 0.0,
) -> dict[str, Any]:
    """fedmerge's ServerApp and ClientApp on Flower's simulation runtime; ``gpu_fraction`` > 0: each
    virtual client trains on that fraction of a GPU (``client-device = cuda``), the server on the CPU."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from fedmerge.flower.server.commit import RoundReport

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        """fedmerge's ServerApp, then the peak RSS of the process that ran it (the simulation's)."""
        make_server_app = load_object("fedmerge_server.app:make_server_app", "ServerApp factory")
        make_server_app(on_round=emit_report)(grid=grid, context=context)
        emit_report({"peak_rss": peak_rss_bytes()})

    reports: list[RoundReport] = []
    rss: list[int] = []

    def on_report(item: Any) -> None:
        if isinstance(item, dict):
            rss.append(item["peak_rss"])
        else:
            reports.append(item)

    with tempfile.TemporaryDirectory() as store:
        config = {
            "store": store, "num-rounds": rounds, "min-clients": clients, "min-valid": clients,
            "aggregator": "fedavg", **(CODEC if codec is None else codec), "task": task,
            "lr": WORKLOADS[task][0], "local-epochs": WORKLOADS[task][1], "dirichlet-alpha": ALPHA,
            "seed": seed, **CLIENT_WORK, "client-device": client_device(gpu_fraction),
        }  # fmt: skip
        run_simulation_app(
            server, "fedmerge_clients.app:app", num_supernodes=clients, run_config=config,
            num_gpus=gpu_fraction, on_report=on_report,
        )  # fmt: skip
    return {
        "round_s": [r.wall_s for r in reports],
        "merge_s": [r.merge_s for r in reports],  # last reply judged -> version committed (and evaluated)
        "bytes": [r.uplink_bytes + r.downlink_bytes for r in reports],
        "downlink": [r.downlink_bytes for r in reports],
        "accuracy": [r.metrics.get("server-accuracy", float("nan")) for r in reports],
        "peak_rss": rss[-1],
    }


def _flower_apps(
    rounds: int,
    clients: int,
    out: dict[str, Any],
    task_name: str = "digits",
    seed: int = SEED,
    device: str = "cpu",
) -> tuple[Any, Any]:
    """A plain Flower FedAvg ServerApp and a quickstart-style ClientApp on the same task and data (the
    client trains on ``device``, as Flower's quickstart-pytorch does: model and batches moved there)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fedmerge.tasks import get_task
    from fedmerge.tasks.evaluate import task_evaluator
    from fedmerge.tasks.local_round import client_generator
    from fedmerge.tasks.partitions import node_partition, partition_for

    lr, epochs = WORKLOADS[task_name]
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        pid, num = node_partition(context)
        task = get_task(task_name)
        data = partition_for(task_name, num, "dirichlet", ALPHA, seed)[pid]
        model = task.build_model(seed)
        model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
        model.to(device)
        round_ = int(message.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        metrics = task.train(
            model, data, epochs=epochs, lr=lr, batch_size=32, generator=client_generator(seed, round_, pid),
            device=device,
        )  # fmt: skip
        reply = RecordDict(
            {
                "arrays": ArrayRecord({k: v.cpu() for k, v in model.state_dict().items()}),
                "metrics": MetricRecord(
                    {"train-loss": metrics["train-loss"], "num-examples": data.num_examples}
                ),
            }
        )
        return Message(reply, reply_to=message)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        base = get_task(task_name).pretrained_base(seed)
        evaluate = task_evaluator(task_name, seed)
        stamps = [time.perf_counter()]

        def evaluate_fn(round_: int, arrays: ArrayRecord) -> MetricRecord:
            if round_ > 0:  # a round ends after its evaluation, as fedmerge's round time includes it
                out["accuracy"].append(evaluate(arrays.to_torch_state_dict())["accuracy"])
                stamps.append(time.perf_counter())
            return MetricRecord({})

        initial = ArrayRecord(base)
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
        stamps[0] = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=evaluate_fn)
        dense = sum(len(a.data) for a in initial.values())  # fp32 weights, each way, per client
        out["round_s"] = [b - a for a, b in itertools.pairwise(stamps)]
        out["bytes"] = [2 * clients * dense] * rounds
        out["peak_rss"] = peak_rss_bytes()
        emit_report(out)  # the ServerApp runs in the simulation's process

    return server, client


def run_flower(
    clients: int, rounds: int, task: str = "digits", seed: int = SEED, gpu_fraction: float = 0.0
) -> dict[str, Any]:
    """Flower's FedAvg with the quickstart-style ClientApp; ``gpu_fraction`` as in :func:`run_fedmerge`."""
    results: list[dict[str, Any]] = []
    server, client = _flower_apps(rounds, clients, {"accuracy": []}, task, seed, client_device(gpu_fraction))
    # the same runtime and Ray settings on both sides
    run_simulation_app(
        server, client, num_supernodes=clients, num_gpus=gpu_fraction, on_report=results.append
    )
    return results[-1]


def child(
    kind: str, clients: int, rounds: int, task: str = "digits", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one side in a fresh process and return its JSON result (``task``: for the LoRA legs, the
    JSON of their run-config overrides; ``options``: ``seed``, ``gpu_fraction`` and, for fedmerge,
    ``codec`` — the run-config keys of both directions' codecs, :data:`CODEC` by default)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:  # removed after the child's run
        env.setdefault("FLWR_HOME", home)
        proc = subprocess.run(
            [sys.executable, "-m", "fedmerge_bench.rounds", "--child", kind, str(clients), str(rounds), task,
             json.dumps(options or {})],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def steady(values: list[float] | list[int]) -> float:
    tail = values[1:] if len(values) > 1 else values
    return statistics.fmean(tail)


def lora_legs(console: Console, rounds: int, seeds: int) -> dict[str, Any]:
    """The worked LoRA example as shipped and the dense LoRA exchange, ``rounds`` rounds, seeds
    0…``seeds``-1 (both legs of a seed at once: mostly start-up and waiting); their keys."""
    nodes, dense = _lora_example.NODES, _lora_example.DENSE
    pairs = []
    with ThreadPoolExecutor(2) as pool:
        for seed in range(max(1, seeds)):
            legs = [json.dumps({"seed": seed}), json.dumps({**dense, "seed": seed})]
            example, reference = (pool.submit(child, "lora", nodes, rounds, leg) for leg in legs)
            pairs.append((example.result(), reference.result()))
    lora = _lora_example.summary(*pairs[0])  # seed 0; over seeds below when asked for
    if len(pairs) > 1:
        lora.update(_lora_example.across_seeds(pairs))
    console.log(
        f"LoRA example, {rounds} rounds: {lora['lora_bytes_vs_dense_lora']:.4f} of the dense "
        f"LoRA exchange's bytes; final loss {lora['lora_loss']:.4f} (dense "
        f"{lora['lora_dense_loss']:.4f}, base {lora['lora_base_loss']:.4f})"
    )
    return lora


def rounded(summary: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()})


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench rounds", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10 clients × 5 rounds; the LoRA example 3 rounds")
    ap.add_argument("--task", choices=sorted(WORKLOADS), default="digits", help="workload (default digits)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved (best of k)")
    ap.add_argument("--no-lora", action="store_true", help="skip the worked LoRA example's legs")
    ap.add_argument("--lora-seeds", type=int, default=1, help="LoRA example legs per seed 0…N-1 (default 1)")
    ap.add_argument("--lora-only", action="store_true", help="only the worked LoRA example's legs")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # KIND CLIENTS ROUNDS TASK [OPTIONS]
    args = ap.parse_args(argv)
    if args.child:
        kind, clients, rounds = args.child[0], int(args.child[1]), int(args.child[2])
        options = json.loads(args.child[4]) if len(args.child) > 4 else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "lora":
                result = _lora_example.run_leg(rounds, json.loads(args.child[3]))
            elif kind == "fedmerge":
                result = run_fedmerge(clients, rounds, args.child[3], **options)
            else:
                result = run_flower(clients, rounds, args.child[3], **options)
        print(json.dumps(result))
        return 0
    console = Console()
    clients, rounds = (10, 5) if args.quick else (20, 5)
    console.log(load_line())
    if args.lora_only:
        lora = lora_legs(console, 3 if args.quick else 5, args.lora_seeds)
        print(rounded({**lora, "load_average_1min": round(load_average()[0], 2)}))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"fedmerge": [], "flower": []}

    def side(kind: str) -> Callable[[], None]:
        def run() -> None:
            result = child(kind, clients, rounds, args.task)
            console.log(f"{kind}: round s {[round(x, 3) for x in result['round_s']]}, "
                        f"accuracy {result['accuracy'][-1]:.4f}")  # fmt: skip
            runs[kind].append(result)

        return run

    interleaved(side("fedmerge"), side("flower"), args.repeats, warmup=False)
    ours = min(runs["fedmerge"], key=lambda r: steady(r["round_s"]))
    ref = min(runs["flower"], key=lambda r: steady(r["round_s"]))
    rss10 = child("fedmerge", 10, 1)["peak_rss"]  # server memory per client count: digits whatever --task
    rss50 = child("fedmerge", 50, 1)["peak_rss"]
    lora = {} if args.no_lora else lora_legs(console, 3 if args.quick else 5, args.lora_seeds)

    table = Table(title=f"{args.task}, {clients} clients, {rounds} rounds, Dirichlet α={ALPHA}, same run")
    for col in ("", "fedmerge (fedavg, rank-8/4 int4)", "Flower FedAvg (dense fp32)", "ratio"):
        table.add_column(col, justify="right")
    rows = [
        ("round time, s (rounds 2…R)", steady(ours["round_s"]), steady(ref["round_s"])),
        ("bytes per round, up + down (rounds 2…R)", steady(ours["bytes"]), steady(ref["bytes"])),
        (
            "bytes per round, up + down (all rounds)",
            statistics.fmean(ours["bytes"]),
            statistics.fmean(ref["bytes"]),
        ),
        ("server peak RSS, MiB", ours["peak_rss"] / 2**20, ref["peak_rss"] / 2**20),
        ("final accuracy", ours["accuracy"][-1], ref["accuracy"][-1]),
    ]
    for label, a, b in rows:
        table.add_row(label, f"{a:,.3f}", f"{b:,.3f}", f"{a / b:.3f}")
    console.print(table)
    console.print(f"best of {args.repeats} interleaved runs per side; {load_line()}")
    console.print(
        f"fedmerge server peak RSS: 10 clients {rss10 / 2**20:.0f} MiB, 50 clients {rss50 / 2**20:.0f} MiB"
    )
    summary = {
        "task": args.task,
        "bytes_vs_flower_fedavg": steady(ours["bytes"]) / steady(ref["bytes"]),
        "bytes_all_rounds_vs_flower_fedavg": statistics.fmean(ours["bytes"]) / statistics.fmean(ref["bytes"]),
        "bytes_vs_flower_fedavg_all_rounds": statistics.fmean(ours["bytes"]) / statistics.fmean(ref["bytes"]),
        # round 1's downlink replaced by the dense base to every client, as Flower's round 1 sends it
        "bytes_all_rounds_base_sent_vs_flower_fedavg": (
            sum(ours["bytes"]) - ours["downlink"][0] + ref["bytes"][0] / 2
        )
        / sum(ref["bytes"]),
        "round_time_vs_flower_fedavg": steady(ours["round_s"]) / steady(ref["round_s"]),
        "accuracy_delta_points": 100 * (ours["accuracy"][-1] - ref["accuracy"][-1]),
        "server_rss_growth_10_to_50": rss50 / rss10,
        "fedmerge_accuracy_per_round": [round(a, 4) for a in ours["accuracy"]],
        "flower_accuracy_per_round": [round(a, 4) for a in ref["accuracy"]],
        "server_peak_rss_vs_flower_fedavg": ours["peak_rss"] / ref["peak_rss"],
        "fedmerge_round_s_per_run": [round(steady(r["round_s"]), 4) for r in runs["fedmerge"]],
        "flower_round_s_per_run": [round(steady(r["round_s"]), 4) for r in runs["flower"]],
        **lora,
        "load_average_1min": round(load_average()[0], 2),
    }
    print(rounded(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
