"""The worked LoRA example (``examples/hf_lora``) on Flower's simulation engine, for ``bench rounds``.

One leg runs the example as it ships (its ``pyproject.toml``'s run config: the compressed uplink and
downlink) or with overrides: three institutions with their own text (``sample_data.write_corpora``),
a 2-layer Llama built by ``make_model.py`` and ``fedmerge init`` from it, ``rounds`` rounds with all
three nodes, then the final version's mean token loss on the three texts (``client_app.mean_token_loss``,
the same loss as the example's ``evaluate``), computed here from the store.

The **dense LoRA exchange** the compressed one is compared with (:data:`DENSE`, run in the same
invocation): every node sends the dense fp32 ΔW = (α/r)·B·A of the adapted weights — the update the
server merges (in product space: fedmerge merges ΔW, not the factors) — and would receive the merged
update of the same tensors, dense fp32, the same size. Its uplink is measured (a ``sparsify = none``,
fp32 package, not deflated: every adapted weight, 16 bytes of framing per tensor beside the values);
its downlink is counted as the same bytes (this leg receives full weights every round instead:
``downlink-density = 1.0``, which would compare the compressed downlink with the whole model, not
with LoRA). The base weights each node receives once in round 1 (both legs alike) are reported apart,
not in the ratio.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_lora"
NODES = 3
# the dense LoRA exchange: the adapted weights' ΔW in fp32 up (and, counted, down), as they are (not
# deflated); full weights down
DENSE: dict[str, Any] = {
    "codec-rank": 0, "codec-density": 1.0, "codec-values": "fp32", "codec-deflate": False,
    "downlink-rank": 0, "downlink-density": 1.0,
}  # fmt: skip


def example_config() -> dict[str, Any]:
    """The example's ``[tool.flwr.app.config]`` (its shipped run config)."""
    with open(EXAMPLE / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def run_leg(rounds: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the example for ``rounds`` rounds with the run-config ``overrides``; bytes per round
    (uplink, downlink), the adapted weights' and LoRA factors' dense fp32 sizes per node, base and
    final loss."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedmerge.flower.server.commit import RoundReport
    from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app
    from fedmerge.store import ModelStore
    from fedmerge.store.init import init_store

    if not (EXAMPLE / "client_app.py").is_file():
        raise FileNotFoundError(f"the worked example is not at {EXAMPLE} (run from a source checkout)")
    sys.path.insert(0, str(EXAMPLE))
    from client_app import TARGET_MODULES, mean_token_loss, read_lines
    from client_app import train as example_train
    from make_model import make_model
    from sample_data import write_corpora

    with tempfile.TemporaryDirectory(prefix="fedmerge-lora-bench-") as tmp:
        work = Path(tmp)
        corpora = write_corpora(work / "data")
        model_dir = make_model(work / "my-lm", corpora)
        store = work / "store"
        init_store(store, model_dir)
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            i = int(context.node_config["partition-id"])
            context.node_config.update({"model-dir": str(model_dir), "data-path": str(corpora[i]),
                                        "client-id": f"inst-{i}"})  # as --node-config would  # fmt: skip
            return example_train(message, context)

        config = {**example_config(), **overrides, "store": str(store), "num-rounds": rounds,
                  "min-clients": NODES, "min-valid": NODES, "fraction-evaluate": 0.0}  # fmt: skip
        reports: list[RoundReport] = []
        path = os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH", "")]))
        run_simulation_app(
            ServerAppFactory("fedmerge_server.app:make_server_app"), app, num_supernodes=NODES,
            run_config=config, on_report=reports.append, env={"PYTHONPATH": path},
        )  # fmt: skip
        committed = [r for r in reports if r.version_id is not None]  # failed attempts' bytes count too
        with ModelStore.open(store) as st:
            root = st.get("v000001")
            base = st.materialize(root)
            final = st.materialize(str(committed[-1].version_id))
        adapted = {n: t for n, t in base.items() if n.endswith(tuple(f"{m}.weight" for m in TARGET_MODULES))}
        rank = int(config["lora-rank"])
        texts = [read_lines(c) for c in corpora]
        return {
            "uplink": [r.uplink_bytes for r in reports],
            "downlink": [r.downlink_bytes for r in reports],
            "rounds": len(committed),
            "base_bytes_per_node": sum(t.numel() * 4 for t in base.values() if t.is_floating_point()),
            "adapted_dense_bytes_per_node": sum(t.numel() * 4 for t in adapted.values()),
            "factor_bytes_per_node": sum(rank * (t.shape[0] + t.shape[1]) * 4 for t in adapted.values()),
            "base_loss": sum(mean_token_loss(base, model_dir, x) for x in texts) / len(texts),
            "loss": sum(mean_token_loss(final, model_dir, x) for x in texts) / len(texts),
        }


def summary(ours: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """The LoRA keys of ``bench rounds``: the example's bytes, up + down over every round (round 1's
    base weights left out, reported apart), against the dense LoRA exchange of the same rounds."""
    rounds = ours["rounds"]
    down = sum(ours["downlink"][1:])  # round 1's downlink: the base weights, once per node
    ours_bytes = sum(ours["uplink"]) + down
    dense_up = sum(dense["uplink"])  # measured: the adapted weights' dense fp32 ΔW from each node
    dense_bytes = 2 * dense_up  # and the merged update of the same tensors back to each node
    factors = 2 * NODES * rounds * ours["factor_bytes_per_node"]
    return {
        "lora_bytes_vs_dense_lora": ours_bytes / dense_bytes,
        "lora_bytes_vs_dense_lora_factors": ours_bytes / factors,
        "lora_uplink_vs_dense": sum(ours["uplink"]) / dense_up,
        "lora_downlink_vs_dense": down / (dense_up * (rounds - 1) / rounds) if rounds > 1 else float("nan"),
        "lora_bytes_per_node_round": ours_bytes / (NODES * rounds),
        "lora_base_bytes_per_node": ours["base_bytes_per_node"],
        "lora_rounds": rounds,
        "lora_loss": ours["loss"],
        "lora_dense_loss": dense["loss"],
        "lora_base_loss": ours["base_loss"],
        "lora_loss_gain_vs_dense": (ours["base_loss"] - ours["loss"]) / (dense["base_loss"] - dense["loss"])
        if not math.isclose(dense["base_loss"], dense["loss"])
        else float("nan"),
    }


def across_seeds(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Keys over several seeds ((example, dense) leg pairs): each seed's losses and byte ratio, the
    mean and sample standard deviation of the loss difference (example − dense), and the dense leg's
    own seed-to-seed standard deviation of its final loss (the noise "equal loss" is judged against)."""
    diffs = [ours["loss"] - dense["loss"] for ours, dense in pairs]
    dense_losses = [dense["loss"] for _, dense in pairs]
    return {
        "lora_seeds": len(pairs),
        "lora_loss_per_seed": [round(ours["loss"], 4) for ours, _ in pairs],
        "lora_dense_loss_per_seed": [round(x, 4) for x in dense_losses],
        "lora_bytes_vs_dense_lora_per_seed": [
            round(summary(ours, dense)["lora_bytes_vs_dense_lora"], 4) for ours, dense in pairs
        ],
        "lora_loss_minus_dense_mean": statistics.fmean(diffs),
        "lora_loss_minus_dense_std": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
        "lora_dense_loss_std_across_seeds": (
            statistics.stdev(dense_losses) if len(dense_losses) > 1 else float("nan")
        ),
    }


if __name__ == "__main__":  # python -m fedmerge_bench._lora_example ROUNDS '{"codec-density": 0.05}'
    print(json.dumps(run_leg(int(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})))
