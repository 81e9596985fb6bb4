"""The PostgreSQL catalog's own promises against a real server: the busy timeout, a database
restarted in the middle of a commit, an unreachable server, a bad URL, fenced writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pg_server import PgServer

from fedmerge.errors import ConfigError
from fedmerge.store import ModelStore, StoreBusyError
from fedmerge.store.faults import FaultPoints
from fedmerge.store.pg_catalog import CatalogUnavailableError, LeaseLostError, redact

BOTH_CATALOGS = True


def _commit(store: ModelStore, parent: str, value: float, round_: int = 1) -> str:
    return store.commit(
        {"w": torch.full((3,), value)},
        parents=[parent],
        method="m",
        params={},
        contributors=[],
        round=round_,
        metrics={},
        privacy=None,
    ).id


def test_a_writer_blocked_past_busy_timeout_gets_a_retryable_error(
    tmp_path: Path, catalog_url: str | None
) -> None:
    path = tmp_path / "store"
    holder = ModelStore.open(path, catalog=catalog_url)
    root = holder.commit_base({"w": torch.zeros(3)}, name="b")
    blocked = ModelStore.open(path, catalog=catalog_url, busy_timeout=0.3)
    with holder.catalog.write():  # another writer (another server, for PostgreSQL) holds the lock
        with pytest.raises(StoreBusyError, match="retry") as info:
            _commit(blocked, root.id, 1.0)
        assert info.value.retryable
    assert [v.id for v in blocked.list()] == [root.id], "nothing became visible"
    assert _commit(blocked, root.id, 1.0) == "v000002"
    assert blocked.verify().ok
    holder.close()
    blocked.close()


def test_two_stores_on_one_catalog_allocate_distinct_ids_and_see_each_other(
    tmp_path: Path, catalog_url: str | None
) -> None:
    a = ModelStore.open(tmp_path / "store", catalog=catalog_url)
    b = ModelStore.open(tmp_path / "store", catalog=catalog_url)
    root = a.commit_base({"w": torch.zeros(3)}, name="b")
    ids = [_commit(a if i % 2 else b, root.id, float(i), i) for i in range(1, 7)]
    assert ids == [f"v{i:06d}" for i in range(2, 8)]
    assert [v.id for v in a.list()] == [v.id for v in b.list()] == list(reversed(["v000001", *ids]))
    assert b.aliases() == {"latest": "v000007"} and a.verify().ok
    a.close()
    b.close()


class _KillDatabaseAt(FaultPoints):
    """SIGKILLs the database server (not this process) when the commit reaches ``step``."""

    def __init__(self, step: str, server: PgServer) -> None:
        super().__init__()
        self.step, self.server = step, server

    def reached(self, step: str) -> None:
        if step == self.step:
            self.server.kill()


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


def test_postgres_restarted_mid_commit_loses_nothing_and_commits_on_retry(
    tmp_path: Path, own_pg: PgServer
) -> None:
    url = own_pg.create_database("catalog")
    store = ModelStore.open(tmp_path / "store", catalog=url, busy_timeout=60)
    root = store.commit_base({"w": torch.zeros(3)}, name="b")
    store._faults = _KillDatabaseAt("catalog-insert", own_pg)  # the rows are inserted, not committed
    with pytest.raises(CatalogUnavailableError, match=r"lost the PostgreSQL catalog .* retry"):
        _commit(store, root.id, 1.0)
    store._faults = FaultPoints()
    own_pg.restart()
    assert [v.id for v in store.list()] == [root.id], "the interrupted commit is not visible"
    assert _commit(store, root.id, 1.0) == "v000002", "its id is reused"
    report = store.verify()
    assert report.ok, report.problems
    store.close()


def test_unreachable_and_malformed_catalogs_are_one_clear_line(tmp_path: Path, own_pg: PgServer) -> None:
    url = own_pg.create_database("gone").replace("postgres@", "postgres:secret@")
    own_pg.kill()
    with pytest.raises(CatalogUnavailableError) as info:
        ModelStore.open(tmp_path / "a", catalog=url, busy_timeout=0.5)
    text = str(info.value)
    assert "cannot reach the PostgreSQL catalog" in text and "secret" not in text and "\n" not in text
    with pytest.raises(ConfigError, match="postgresql://user@host:port/database"):
        ModelStore.open(tmp_path / "b", catalog="mysql://x/y")
    assert redact("postgresql://u:pw@h:1/d") == "postgresql://u:***@h:1/d"


def test_a_fenced_write_without_its_lease_commits_nothing(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.create_database("fenced")
    store = ModelStore.open(tmp_path / "store", catalog=url)
    root = store.commit_base({"w": torch.zeros(3)}, name="b")
    catalog = store.catalog
    catalog.set_fence("continual", "replica-a", 1)  # type: ignore[attr-defined]
    with pytest.raises(LeaseLostError, match="expired or was taken over"):
        _commit(store, root.id, 1.0)
    catalog._pg.execute(  # type: ignore[attr-defined]
        "INSERT INTO leases (track, holder, token, expires_at) VALUES (?, ?, ?, now() + interval '1 minute')",
        ("continual", "replica-a", 1),
    )
    assert _commit(store, root.id, 1.0) == "v000002"
    catalog._pg.execute("UPDATE leases SET expires_at = now() - interval '1 second'")  # type: ignore[attr-defined]
    with pytest.raises(LeaseLostError):
        _commit(store, root.id, 2.0)
    assert [v.id for v in store.list()] == ["v000002", root.id]
    store.close()


def test_a_store_whose_catalog_is_in_postgres_is_not_opened_on_sqlite(
    tmp_path: Path, pg_server: PgServer
) -> None:
    url = pg_server.create_database("marked")
    with ModelStore.open(tmp_path / "store", catalog=url) as store:
        store.commit_base({"w": torch.zeros(3)}, name="b")
        assert store.verify().ok, "the marker is the store's own file"
    with pytest.raises(ConfigError, match=r"is in PostgreSQL .*pass its URL"):
        ModelStore.open(tmp_path / "store")
    assert not (tmp_path / "store" / "catalog.sqlite").exists()


def test_the_store_commands_read_and_init_a_shared_catalog(tmp_path: Path, pg_server: PgServer) -> None:
    import subprocess
    import sys

    from safetensors.torch import save_file

    url = pg_server.create_database("cli")
    save_file({"w": torch.ones(4)}, str(tmp_path / "base.safetensors"))
    store = str(tmp_path / "store")

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run(
            [sys.executable, "-m", "fedmerge.cli", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )

    made = cli("init", "--catalog", url, "--store", store, "--base", str(tmp_path / "base.safetensors"))
    assert made.returncode == 0, made.stderr
    listed = cli("store", "versions", "--store", store, "--json", env={"FEDMERGE_CATALOG": url})
    assert listed.returncode == 0 and "v000001" in listed.stdout, listed.stderr
    refused = cli("store", "versions", "--store", store)
    said = " ".join((refused.stdout + refused.stderr).split())  # the console wraps long lines
    assert refused.returncode == 1 and "is in PostgreSQL" in said and "pass its URL" in said
    assert "Traceback" not in refused.stdout + refused.stderr


def test_the_dashboard_reads_the_shared_catalog_it_is_given(
    tmp_path: Path, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmerge.dashboard.views import CATALOG_ENV, open_store

    url = pg_server.create_database("dash")
    with ModelStore.open(tmp_path / "store", catalog=url) as store:
        store.commit_base({"w": torch.zeros(3)}, name="b")
    monkeypatch.delenv(CATALOG_ENV, raising=False)
    with pytest.raises(ConfigError, match="is in PostgreSQL"):
        open_store(tmp_path / "store")
    monkeypatch.setenv(CATALOG_ENV, url)
    with open_store(tmp_path / "store") as seen:
        assert [v.id for v in seen.list()] == ["v000001"]
