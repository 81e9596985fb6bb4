"""Writes ``state_format1.safetensors``: continual-merger states and results recorded by the code
before the continual mergers became batch aggregators plus state (commit ea2d7cb).

Run once, on that commit: ``python tests/continual/data/make_state_fixture.py``. The file is
committed; ``tests/continual/test_batch_adaptor.py`` loads each state into today's code and checks
that it gives the recorded merged vectors, before and after two more experts. Rerunning this on
later code must write the same tensors (that is what the test asserts), so do not regenerate it to
make a failing test pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmerge.aggregators.continual import create_continual

CASES: dict[str, tuple[str, dict[str, object]]] = {
    "task_arithmetic": ("continual_task_arithmetic", {}),
    "task_arithmetic_0.7": ("continual_task_arithmetic", {"scaling": 0.7}),
    "magmax": ("magmax", {}),
    "magmax_1.0": ("magmax", {"scaling": 1.0}),
    "ties": ("continual_ties", {}),
    "ties_tensor": ("continual_ties", {"density": 0.5, "trim_scope": "tensor"}),
    "running_average": ("running_average", {}),
    "opcm": ("opcm", {}),
}
SHAPES = {"embed.weight": (11, 6), "fc1.weight": (12, 6), "fc1.bias": (12,), "fc2.weight": (5, 12)}
NUM_EXPERTS, SAVED_AFTER = 5, 3


def experts() -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(NUM_EXPERTS):
        g = torch.Generator().manual_seed(1000 + i)
        out.append({k: (0.5 + 0.2 * i) * torch.randn(s, generator=g) for k, s in SHAPES.items()})
    out[1]["fc1.bias"][:4] = -out[0]["fc1.bias"][:4]  # equal magnitudes of opposite sign (MagMax ties)
    out[2]["fc2.weight"][0] = 0.0
    return out


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    taus = experts()
    for i, tau in enumerate(taus):
        tensors.update({f"expert/{i}/{k}": v for k, v in tau.items()})
    for case, (method, params) in CASES.items():
        merger = create_continual(method, **params)
        for tau in taus[:SAVED_AFTER]:
            merger.add_expert(tau)
        tensors.update({f"{case}/state/{k}": v for k, v in merger.state_dict().items()})
        tensors.update({f"{case}/merged_{SAVED_AFTER}/{k}": v for k, v in merger.merged().items()})
        for tau in taus[SAVED_AFTER:]:
            merger.add_expert(tau)
        tensors.update({f"{case}/merged_{NUM_EXPERTS}/{k}": v for k, v in merger.merged().items()})
    meta = {"cases": json.dumps(CASES), "saved_after": str(SAVED_AFTER), "num_experts": str(NUM_EXPERTS)}
    save_file(tensors, str(Path(__file__).with_name("state_format1.safetensors")), metadata=meta)


if __name__ == "__main__":
    main()
