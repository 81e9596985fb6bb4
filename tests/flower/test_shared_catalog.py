"""Rounds on a shared PostgreSQL catalog: the ServerApp commits to it, a second ServerApp (another
host's, after the first died) continues from it, and the store's commands read it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.clientapp import ClientApp

from fedmerge.errors import ConfigError
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent.parent / "store"))

from pg_server import PgServer

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]


@pytest.fixture
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


def test_the_catalog_key_takes_a_postgresql_url_only() -> None:
    assert parse_run_config({"catalog": "postgresql://u@db:5432/fedmerge"}).catalog.startswith("postgresql")
    assert parse_run_config({}).catalog == ""
    with pytest.raises(ConfigError, match="catalog='sqlite:///x' must be a postgresql://"):
        parse_run_config({"catalog": "sqlite:///x"})


@pytest.mark.slow
def test_a_second_server_app_continues_from_the_shared_catalog(
    tmp_path: Path, pg: PgServer, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    url = pg.create_database("rounds")
    store = tmp_path / "store"
    common: dict[str, Any] = {"min_clients": 3, "min_valid": 2, "catalog": url}
    first = simulate(store, scripted_client_app(["ok", "ok", "ok"]), 3, **common)
    assert [r.version_id for r in first] == ["v000002"]
    assert not (store / "catalog.sqlite").exists(), "the versions are in PostgreSQL"
    second = simulate(store, scripted_client_app(["ok", "ok", "ok"]), 3, num_rounds=2, **common)
    assert [(r.round, r.base_version_id, r.version_id) for r in second] == [
        (2, "v000002", "v000003"),
        (3, "v000003", "v000004"),
    ]
    with ModelStore.open(store, catalog=url) as st:
        assert sorted(v.round for v in st.list() if v.round is not None) == [1, 2, 3]
        assert st.verify().ok
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmerge.cli",
            "store",
            "--catalog",
            url,
            "versions",
            "--store",
            str(store),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "v000004" in listed.stdout
