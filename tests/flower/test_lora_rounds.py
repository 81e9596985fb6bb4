"""LoRA rounds (``mode="lora"``, peft adapters, merged in product space) on the ``tiny_lm`` task.

Each client trains rank-r adapters on the LoRA target modules and sends ΔW = (α/r)·B·A as a
compressed task vector; the merged delta of every committed version must be zero outside the
target modules (embeddings, norms, ``gate_proj``, ``lm_head`` untouched) and non-zero on them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from flwr.clientapp import ClientApp

from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore
from fedmerge_simulations.tasks import get_task

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]


def _targeted(name: str, targets: list[str]) -> bool:
    return any(f".{t}." in name for t in targets)


def test_two_lora_rounds_commit_deltas_restricted_to_target_modules(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    targets = get_task("tiny_lm").lora_targets
    reports = simulate(
        store, scripted_client_app(["ok", "ok"]), 2,
        task="tiny_lm", mode="lora", num_rounds=2, min_clients=2, min_valid=2, lr=0.01, lora_rank=2,
    )  # fmt: skip
    assert [(r.round, r.version_id, len(r.accepted)) for r in reports] == [
        (1, "v000002", 2),
        (2, "v000003", 2),
    ]
    with ModelStore.open(store) as st:
        base = st.materialize("v000001")
        for vid in ("v000002", "v000003"):
            version = st.get(vid)
            assert version.params["mode"] == "lora" and version.method == "ties"
            delta = st.load_delta(version)
            on_target = [n for n in base if _targeted(n, targets)]
            assert len(on_target) == 12  # 6 target modules × 2 layers
            for name, weight in base.items():
                d = delta.get(name, torch.zeros_like(weight))
                if _targeted(name, targets):
                    assert float(d.abs().sum()) > 0, f"{vid}: {name} is a LoRA target but did not change"
                else:
                    assert torch.count_nonzero(d) == 0, f"{vid}: {name} is not a LoRA target but changed"
        # the round-2 base is the round-1 merge: weights differ from the pre-trained base on targets only
        merged = st.materialize("v000003")
        changed = {n for n in base if not torch.equal(base[n], merged[n])}
        assert changed == set(on_target)
        assert st.verify().ok
