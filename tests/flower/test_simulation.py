"""Rounds on Flower's simulation engine (Ray) against a real store: faults, interop, min-valid, resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.clientapp import ClientApp

from fedmerge.flower.rounds import RoundAborted, RoundReport
from fedmerge.store import ModelStore

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]


def _reasons(store: Path, ref: str) -> dict[str, tuple[bool, str | None]]:
    with ModelStore.open(store) as st:
        return {c.client_id: (c.accepted, c.reason) for c in st.get(ref).contributors}


def test_faulty_and_dense_replies_are_recorded_and_the_rest_is_merged(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    plan = ["ok", "truncated", "duplicate", "crash", "dense", "stale"]
    reports = simulate(store, scripted_client_app(plan), len(plan), min_clients=6, min_valid=2)
    assert len(reports) == 1 and reports[0].version_id == "v000002"
    outcomes = {o.node_id: o for o in reports[0].outcomes}
    assert len(outcomes) == 6
    with ModelStore.open(store) as st:
        version = st.get("latest")
        assert version.round == 1 and version.parents == ("v000001",)
        assert version.method == "ties" and version.params["divisor"] == "weight"
        contributors = version.contributors
        accepted = sorted(c.client_id for c in contributors if c.accepted)
        reasons = [c.reason or "" for c in contributors if not c.accepted]
        # client-0, the node that also calls itself client-0 (identity is the node: it is merged under
        # a qualified label) and the dense client are merged
        assert len(accepted) == 3 and "client-0" in accepted
        assert any(a.startswith("client-0@node-") for a in accepted)
        assert any(a.startswith("node-") for a in accepted)  # the plain dense Flower client
        assert len(reasons) == 3
        joined = " | ".join(reasons)
        assert "stale" in joined and "v000000" in joined
        assert "simulated crash" in joined
        assert "PayloadSizeMismatch" in joined or "MalformedPackage" in joined
        assert version.metrics["accepted"] == 3.0 and version.metrics["rejected"] == 3.0
        assert 0.0 <= version.metrics["server-accuracy"] <= 1.0
        # the merged delta is not zero and the new weights differ from the base
        delta = st.load_delta(version)
        assert any(float(t.abs().sum()) > 0 for t in delta.values())
        assert st.verify().ok


def test_too_few_valid_replies_commit_nothing_and_retry(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    with pytest.raises(RoundAborted, match=r"min-valid=2 valid replies in 2 attempt\(s\)") as info:
        simulate(
            store, scripted_client_app(["ok", "crash", "crash"]), 3, min_clients=3, min_valid=2, max_retries=1
        )
    assert "simulated crash" in str(info.value)
    with ModelStore.open(store) as st:
        assert [v.id for v in st.list()] == ["v000001"]  # only the base


def test_resume_continues_from_latest_round_and_rejects_older_base(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    """A second run (new ServerApp, new SuperNodes) continues at round 2 from v000002."""
    store = tmp_path / "store"
    common: dict[str, Any] = {"min_clients": 3, "min_valid": 2}
    first = simulate(store, scripted_client_app(["ok", "ok", "ok"]), 3, **common)
    assert [r.version_id for r in first] == ["v000002"]
    second = simulate(store, scripted_client_app(["ok", "ok", "stale"]), 3, num_rounds=2, **common)
    assert [(r.round, r.base_version_id, r.version_id) for r in second] == [
        (2, "v000002", "v000003"),
        (3, "v000003", "v000004"),
    ]
    assert all("stale" in (o.reason or "") for r in second for o in r.rejected)
    with ModelStore.open(store) as st:
        rounds = [v.round for v in st.list()]
        assert sorted(r for r in rounds if r is not None) == [1, 2, 3]  # no round committed twice
        assert st.get("latest").parents == ("v000003",)
