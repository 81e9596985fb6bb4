"""A reply that omits tensors is judged in rounds exactly as in the intake (fedmerge.submission): a
base tensor a task-vector package leaves out is zero change, an empty package and a LoRA package
missing a factor are rejected with one reason — and none of them raises out of
``Federation.run_round``, whatever the round does after judging (anomaly screening, DP, the server
optimiser, the compressed downlink, robust aggregators). Real Flower messages through an in-process
grid (protobuf round trips), a real store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedmerge.flower.config import parse_run_config
from fedmerge.flower.records import FEDMERGE_RECORD
from fedmerge.flower.server.federation import Federation, ensure_base
from fedmerge.flower.transport import package_to_record
from fedmerge.store import ModelStore
from fedmerge_simulations.secagg import InProcessGrid
from fedmerge_testing.hostile import Valid, flower_valid, mlp_base
from fedmerge_testing.hostile.mutations import _lora_package

HONEST = 3  # nodes 1000..1002 reply honest packages; node 1003 + i replies omission i (sorted names)


LARGEST = "fc1.weight"  # the tensor the omitting replies leave out (mlp_base's largest)


def _omit_one(valid: Valid) -> bytes:
    return valid.encode(delta={k: v for k, v in valid.delta.items() if k != LARGEST})


OMISSIONS = {
    "missing-tensor": _omit_one,
    "missing-lora-factor": lambda v: _lora_package(v, drop="lora_A"),
    "missing-lora-b": lambda v: _lora_package(v, drop="lora_B"),
    "empty-package": lambda v: v.encode(delta={}),
    "dense-missing-tensor": lambda v: b"",  # full weights without one tensor (see _client_app)
}

EXPECTED_REASON = {
    "missing-lora-factor": "package kind 'lora' where a task vector was expected",
    "missing-lora-b": "package kind 'lora' where a task vector was expected",
    "empty-package": "",
    "dense-missing-tensor": f"{LARGEST!r}",
}

DENSE = {"codec-density": 1.0, "codec-values": "fp32"}  # packages of dense tensors: the dense fold
CONFIGS: dict[str, dict[str, Any]] = {
    "ties": {},
    "ties-dense": DENSE,
    "fedavg-dense": {"aggregator": "fedavg", **DENSE},
    "magmax-dense": {"aggregator": "magmax", **DENSE},
    "fedavg-compressed-downlink": {"aggregator": "fedavg", "downlink-density": 0.5},
    "anomaly-screening": {"aggregator": "fedavg", "reject-anomalies": 3.0, "reject-min-cosine": -0.5},
    "central-dp": {"aggregator": "fedavg", "dp-clip-norm": 1.0, "dp-noise-multiplier": 0.1},
    "server-adam": {"aggregator": "fedavg", "server-optimizer": "adam"},
    "median": {"aggregator": "median"},
    "magmax": {"aggregator": "magmax"},
    "dare-ties": {"aggregator": "dare_ties"},
}


pytestmark = pytest.mark.usefixtures("server_identity")


def _client_app(base: dict[str, torch.Tensor], cfg: Any, omissions: list[str]) -> Any:
    """A ClientApp replying fedmerge packages: honest ones from nodes 1000..1002, omission ``i`` from
    node 1003 + i."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        extras = msg.content.config_records[FEDMERGE_RECORD]
        partition = context.node_id - 1000
        valid = flower_valid(
            base, partition=partition, round_=int(extras["round"]), base_id=str(extras["base-version-id"]),
            base_hash=str(extras["base-version-hash"]), codec=cfg.codec.config(),
            limit_bytes=cfg.rounds.max_package_bytes,
        )  # fmt: skip
        omission = omissions[partition - HONEST] if partition >= HONEST else None
        if omission == "dense-missing-tensor":  # a plain client's full weights without one tensor
            weights = {k: (t + valid.delta[k]).numpy() for k, t in base.items() if k != LARGEST}
            arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 100})})
            return Message(content, reply_to=msg)
        data = valid.data if omission is None else OMISSIONS[omission](valid)
        content = package_to_record(data)
        content["metrics"] = MetricRecord({"num-examples": 100})
        return Message(content, reply_to=msg)

    return app


def _run(
    tmp_path: Path, overrides: dict[str, Any], omissions: list[str]
) -> tuple[Any, dict[str, torch.Tensor]]:
    raw = {
        "store": str(tmp_path / "store"), "min-clients": HONEST + len(omissions), "min-valid": 2,
        "num-rounds": 1, "server-eval": False, "wait-for-nodes-s": 0.0, "max-retries": 0,
        "codec-density": 0.5,
        **overrides,
    }  # fmt: skip
    cfg = parse_run_config(raw)
    base = mlp_base(0)
    with ModelStore.open(cfg.store) as store:
        ensure_base(store, lambda: base, name="mlp")
        grid = InProcessGrid(_client_app(base, cfg, omissions), HONEST + len(omissions))
        fed = Federation(grid, cfg, store)
        report = fed.run_round(1)
        merged = store.materialize(store.get(report.version_id)) if report.version_id else {}
    return report, merged


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_omitting_replies_never_raise_out_of_the_round(tmp_path: Path, config: str) -> None:
    omissions = sorted(OMISSIONS)
    report, merged = _run(tmp_path, CONFIGS[config], omissions)
    assert report.version_id is not None, report.outcomes
    by_node = {o.node_id: o for o in report.outcomes}
    assert all(by_node[1000 + p].accepted for p in range(HONEST)), report.outcomes
    for i, omission in enumerate(omissions):
        out = by_node[1000 + HONEST + i]
        if omission == "missing-tensor":  # zero change for the missing tensor, as in the intake
            assert out.accepted or "anomal" in str(out.reason).lower(), out.reason
        else:
            assert not out.accepted and out.reason and EXPECTED_REASON[omission] in out.reason, out
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_a_missing_tensor_is_zero_change_in_the_merge_as_in_the_intake(tmp_path: Path) -> None:
    """FedAvg of two full clients and one that leaves out ``fc1.weight``: that tensor's merge is the
    mean with the omitting client counted as τ = 0 (fedmerge.submission's rule), the others' the
    plain mean of all three."""
    from fedmerge_testing.hostile import synthetic_delta

    exact = {
        "aggregator": "fedavg",
        "codec-density": 1.0,
        "codec-values": "fp32",
        "codec-error-feedback": False,
    }
    report, merged = _run(tmp_path, exact, ["missing-tensor"])
    assert len(report.accepted) == 4, report.outcomes
    base = mlp_base(0)
    deltas = [synthetic_delta(base, p) for p in range(4)]
    for name, tensor in base.items():
        parts = [d[name] for p, d in enumerate(deltas) if not (p == HONEST and name == LARGEST)]
        expected = tensor + sum(parts, torch.zeros_like(tensor)) / 4
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(merged[LARGEST], base[LARGEST] + sum(d[LARGEST] for d in deltas) / 4)
