"""The bf16 worked example's rounds: bytes per round (up and down) and round time against dense bf16.

``python -m bench hf_bf16 [--quick] [--rounds R]``

The Hugging Face worked example (``examples/hf_lora``: ``make_model.py --dtype bfloat16`` — a 2-layer
Llama, hidden 64, saved in bf16 — and its ClientApp, LoRA rank 4 on q/v with fedmerge's client
library) with three institutions, each on its own text file, on an in-process Flower grid (every
message through a protobuf round trip, the example's ClientApp unchanged, no Ray). Two federations
run side by side, one round of each in turn (interleaved, so both see the same machine load):

* **fedmerge**: the run config's default codec (top-10 % + int8 with error feedback);
* **dense bf16** (the reference): the same clients replying the whole ΔW as dense bf16 values
  (``codec-density = 1``, ``codec-values = bf16``): what a bf16 exchange of the update costs.

Per round: uplink bytes (all clients' replies as they travelled), downlink bytes (the base to each
node: bf16 widened to fp32 in Flower's ``"arrays"``), and the round's wall time (sampling to commit:
clients train inside it). The uplink ratio is fedmerge / dense bf16 measured; the time ratio compares
the best round of each (rounds ≥ 2, the first warms up). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmerge_bench.timing import load_line

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_lora"


def _client_app(model_dir: Path, corpora: list[Path]) -> Any:
    """The example's ClientApp with each node's ``--node-config`` (model-dir, data-path, client-id)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    sys.path.insert(0, str(EXAMPLE))
    from client_app import train as example_train

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        context.node_config.update(
            {"model-dir": str(model_dir), "data-path": str(corpora[i]), "client-id": f"inst-{i}"}
        )
        return example_train(message, context)

    return app


def _federation(work: Path, name: str, model_dir: Path, corpora: list[Path], extra: dict[str, Any]) -> Any:
    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.federation import Federation
    from fedmerge.store import ModelStore
    from fedmerge.store.init import init_store
    from fedmerge_simulations.secagg import InProcessGrid

    store_dir = work / name
    init_store(store_dir, model_dir)
    cfg = parse_run_config(
        {"store": str(store_dir), "task": "hf_causal_lm", "mode": "lora", "min-clients": 3, "min-valid": 3,
         "server-eval": False, "init-base": False, "lr": 0.01, "local-epochs": 1, "batch-size": 8,
         "wait-for-nodes-s": 0.0, **extra}
    )  # fmt: skip
    store = ModelStore.open(store_dir)
    fed = Federation(InProcessGrid(_client_app(model_dir, corpora), 3), cfg, store)
    fed.warm_up()
    return fed


def run(rounds: int, lines: int) -> dict[str, Any]:
    import torch
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    sys.path.insert(0, str(EXAMPLE))
    from make_model import make_model
    from sample_data import write_corpora  # the example's three institutions' texts

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    with tempfile.TemporaryDirectory(prefix="bench-hf-bf16-") as tmp:
        work = Path(tmp)
        corpora = write_corpora(work, lines)
        model_dir = make_model(work / "my-lm", corpora, dtype="bfloat16")
        legs = {
            "fedmerge": _federation(work, "fedmerge", model_dir, corpora, {}),
            "dense-bf16": _federation(work, "dense", model_dir, corpora,
                                      {"codec-density": 1.0, "codec-values": "bf16"}),
        }  # fmt: skip
        base = legs["fedmerge"].store.materialize(legs["fedmerge"].store.get("latest"))
        floating = [t for t in base.values() if t.is_floating_point()]
        params = sum(t.numel() for t in floating)
        assert {t.dtype for t in floating} == {torch.bfloat16}, "the example model must be bf16"
        per_round: dict[str, list[dict[str, float]]] = {k: [] for k in legs}
        try:
            for r in range(1, rounds + 1):
                for name, fed in legs.items():  # interleaved: one round of each in turn
                    report = fed.run_round(r)
                    if report.version_id is None or len(report.accepted) != 3:
                        raise RuntimeError(
                            f"{name} round {r}: {[(o.client_id, o.reason) for o in report.outcomes]}"
                        )
                    dtypes = {
                        t.dtype for t in fed.store.materialize(fed.store.get(report.version_id)).values()
                    }
                    assert dtypes == {torch.bfloat16}, f"{name} round {r} committed {dtypes}"
                    per_round[name].append(
                        {"round": r, "uplink": report.uplink_bytes, "downlink": report.downlink_bytes,
                         "wall_s": report.wall_s}
                    )  # fmt: skip
        finally:
            for fed in legs.values():
                fed.store.close()
    dense_bf16 = 2 * params * 3  # three clients' whole update in bf16
    timed = {k: [x["wall_s"] for x in v[1:]] or [v[0]["wall_s"]] for k, v in per_round.items()}
    ours, ref = per_round["fedmerge"], per_round["dense-bf16"]
    return {
        "bench": "hf_bf16",
        "model": "examples/hf_lora make_model --dtype bfloat16 (Llama 2 layers, hidden 64), LoRA r=4 q/v",
        "params": params,
        "clients": 3,
        "rounds": rounds,
        "dense_bf16_bytes_per_round": dense_bf16,
        "fedmerge": ours,
        "dense_bf16_measured": ref,
        "uplink_ratio": sum(x["uplink"] for x in ours) / sum(x["uplink"] for x in ref),
        "uplink_ratio_vs_dense_bf16": sum(x["uplink"] for x in ours) / (dense_bf16 * rounds),
        "downlink_per_round": ours[0]["downlink"],
        "round_s_best": min(timed["fedmerge"]),
        "dense_bf16_round_s_best": min(timed["dense-bf16"]),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench hf_bf16", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds on 24 lines per client")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 4)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 4)
    console = Console()
    console.log(load_line())
    result = run(rounds, 24 if args.quick else 64)
    table = Table(title=f"bf16 worked example, {result['params']:,} parameters, 3 clients (bytes per round)")
    for col in ("round", "fedmerge up", "dense bf16 up", "up ratio", "down (fp32-widened base)", "round s",
                "dense bf16 round s"):  # fmt: skip
        table.add_column(col, justify="right")
    for ours, ref in zip(result["fedmerge"], result["dense_bf16_measured"], strict=True):
        table.add_row(str(ours["round"]), f"{ours['uplink']:,}", f"{ref['uplink']:,}",
                      f"{ours['uplink'] / ref['uplink']:.4f}", f"{ours['downlink']:,}",
                      f"{ours['wall_s']:.2f}", f"{ref['wall_s']:.2f}")  # fmt: skip
    console.print(table)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
