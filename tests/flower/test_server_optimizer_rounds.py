"""A server optimiser in real rounds (Flower's simulation engine): each committed version is the optimiser's
step and carries its state, and a restarted server continues from the stored moments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.clientapp import ClientApp

from fedmerge.aggregators.server_optimizer import STATE_PREFIX
from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]


@pytest.mark.slow
def test_adam_rounds_commit_the_step_and_persist_the_state(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    app = scripted_client_app(["ok", "ok"])
    opts = {
        "aggregator": "fedavg",
        "server_optimizer": "adam",
        "server_lr": 0.01,
        "server_tau": 1e-3,
        "round_deadline_s": 600.0,
        "wait_for_nodes_s": 300.0,
    }  # generous: a loaded machine is slow
    first = simulate(store, app, 2, min_clients=2, min_valid=2, **opts)
    # a second run is a restarted server: it reads the moments from the version it resumes from
    second = simulate(store, app, 2, min_clients=2, min_valid=2, **opts)
    assert [r.version_id for r in first + second] == ["v000002", "v000003"]
    prefix = f"{STATE_PREFIX}adam/"
    with ModelStore.open(store) as st:
        for vid, expected_step in (("v000002", 1), ("v000003", 2)):
            version = st.get(vid)
            assert version.params["server-optimizer"]["kind"] == "adam"
            assert version.params["server-optimizer"]["lr"] == 0.01
            state = st.load_state(vid)
            assert state is not None and int(state[prefix + "step"]) == expected_step
            delta = st.load_delta(vid)
            assert delta, "the version holds a delta"
            for name, d in delta.items():
                m, v = state[prefix + "m/" + name], state[prefix + "v/" + name]
                # the committed delta is η·m/(√v+τ), not the aggregator's merge
                torch.testing.assert_close(d.float(), 0.01 * m / (v.sqrt() + 1e-3), rtol=1e-5, atol=1e-8)
        # the second step started from the first's moments: m₂ = β₁·m₁ + (1−β₁)·Δ₂ ≠ (1−β₁)·Δ₂ alone
        s1, s2 = st.load_state("v000002"), st.load_state("v000003")
        assert s1 is not None and s2 is not None
        name = next(iter(st.load_delta("v000003")))
        m1, m2 = s1[prefix + "m/" + name], s2[prefix + "m/" + name]
        v1, v2 = s1[prefix + "v/" + name], s2[prefix + "v/" + name]
        d2_from_m = (m2 - 0.9 * m1) / 0.1
        d2_from_v = (v2 - 0.99 * v1) / 0.01
        torch.testing.assert_close(d2_from_m.square(), d2_from_v, rtol=1e-3, atol=1e-9)
        assert st.verify().ok


@pytest.mark.slow
def test_with_the_compressed_downlink_both_states_are_kept_apart(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    """FedAvgM and the compressed downlink persist their state side by side in each version; the
    residual keeps only weight names, and a restarted server continues both."""
    store = tmp_path / "store"
    app = scripted_client_app(["ok", "ok"])
    opts = {
        "aggregator": "fedavg",
        "server_optimizer": "avgm",
        "server_lr": 0.5,
        "downlink_density": 0.5,
        "downlink_values": "fp32",
        "round_deadline_s": 600.0,
        "wait_for_nodes_s": 300.0,
    }
    first = simulate(store, app, 2, min_clients=2, min_valid=2, **opts)
    second = simulate(store, app, 2, min_clients=2, min_valid=2, **opts)
    assert [r.version_id for r in first + second] == ["v000002", "v000003"]
    assert all(len(r.accepted) == 2 for r in first + second)
    prefix = f"{STATE_PREFIX}avgm/"
    with ModelStore.open(store) as st:
        names = set(st.load_delta("v000003"))
        for vid, step in (("v000002", 1), ("v000003", 2)):
            state = st.load_state(vid)
            assert state is not None and int(state[prefix + "step"]) == step
            residual = {k for k in state if not k.startswith(STATE_PREFIX)}
            assert residual == names  # the downlink residual: one tensor per weight, nothing else
            assert {k[len(prefix) + 2 :] for k in state if k.startswith(prefix + "v/")} == names
        assert st.verify().ok
