"""Stores for the dashboard tests.

``small_store``: built through the store's API in a few hundred milliseconds (a root, two rounds, one
contributor rejected with a reason, an alias moved and rolled back) — for the HTTP tests.
``demo_store``: what ``fedmerge demo`` writes (Flower's simulation engine, 3 clients, 2 rounds, one
client's reply lost to an injected dropout so it is recorded as rejected), then a two-input TIES
recipe merge of the rounds and an alias rolled back — for the browser tests.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedmerge.store import Contributor, ModelStore

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-test-token-0123456789"


@dataclass(frozen=True)
class StoreFacts:
    """What the tests expect to find: every version id, a rejected client and its reason, the rollback."""

    root: Path
    versions: list[str]
    rejected_client: str
    rejected_reason: str
    rolled_back_alias: str
    merge_version: str | None = None


def _hash(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> StoreFacts:
    root = tmp_path_factory.mktemp("dash") / "store"
    gen = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(8, 4, generator=gen), "layer.bias": torch.zeros(8)}
    reason = "non-finite values in 'layer.weight' (nan at index 3)"
    with ModelStore.open(root) as st:
        v1 = st.commit_base(base, name="tiny")
        ids = [v1.id]
        parent = v1.id
        for rnd in (1, 2):
            delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            contributors = [
                Contributor("client-0", 100, _hash(rnd * 10)),
                Contributor("client-1", 80, _hash(rnd * 10 + 1)),
                Contributor(
                    "client-2",
                    50,
                    _hash(rnd * 10 + 2),
                    accepted=rnd != 2,
                    reason=None if rnd != 2 else reason,
                ),
            ]
            v = st.commit(
                delta,
                parents=[parent],
                method="fedavg",
                params={"round": rnd},
                contributors=contributors,
                round=rnd,
                metrics={
                    "server-accuracy": 0.5 + 0.1 * rnd,
                    "server-loss": 1.0 / rnd,
                    "uplink-bytes": 1000.0 * rnd,
                    "downlink-bytes": 4000.0,
                    "accepted": float(sum(c.accepted for c in contributors)),
                    "rejected": float(sum(not c.accepted for c in contributors)),
                },
                privacy={"mechanism": "gaussian", "epsilon": 0.7 * rnd, "delta": 1e-5},
            )
            ids.append(v.id)
            parent = v.id
        st.set_alias("prod", ids[1])
        st.set_alias("prod", ids[2])
        st.rollback("prod")
    return StoreFacts(root, ids, "client-2", reason, "prod")


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> StoreFacts:
    """A real demo run (Flower simulation), then a recipe merge of its two rounds and a rollback."""
    from rich.console import Console

    from fedmerge.recipes import run_recipe
    from fedmerge_simulations.demo import run_demo

    home = tmp_path_factory.mktemp("flwr-home")
    saved = {k: os.environ.get(k) for k in ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED")}
    os.environ.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    root = tmp_path_factory.mktemp("demo") / "store"
    printed = io.StringIO()
    try:
        # seed 3: the injected dropout (p = 0.4) loses one of the three replies in each round
        # (fedmerge.flower.client.faults.draw_faults is a pure function of seed, round and partition)
        reports = run_demo(
            root,
            num_clients=3,
            rounds=2,
            overrides={"fault-dropout": 0.4, "seed": 3, "local-epochs": 1},
            console=Console(file=printed, width=200),
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert [r.version_id for r in reports] == ["v000002", "v000003"], reports
    # the demo ends with the command that opens its dashboard
    assert (
        printed.getvalue().rstrip().splitlines()[-1]
        == f"open its dashboard: fedmerge dashboard --store {root}"
    )
    rejected = [c for r in reports for c in r.rejected]
    assert rejected, "the demo fixture needs a rejected contributor; change the seed"
    with ModelStore.open(root) as st:
        merged = run_recipe(
            {
                "merge_method": "ties",
                "base_model": "store:v000001",
                "models": [
                    {"model": "store:v000002", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "store:v000003", "parameters": {"weight": 1.0, "density": 0.5}},
                ],
                "parameters": {"lambda": 1.0},
            },
            st,
            aliases=("merged",),
        )
        st.set_alias("prod", "v000002")
        st.set_alias("prod", "v000003")
        st.rollback("prod")
        versions = sorted(v.id for v in st.list())
        bad = next(c for v in st.list() for c in v.contributors if not c.accepted)
    assert bad.reason
    return StoreFacts(root, versions, bad.client_id, bad.reason, "prod", merged.version)


@pytest.fixture()
def dashboard_token() -> str:
    return TOKEN


@pytest.fixture()
def chromium_path() -> Iterator[str]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)")
    yield str(CHROMIUM)
