"""Shared fixtures for the model-store tests: tiny seeded models, a fresh store, the fork server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from fedmerge.store import ModelStore
from fedmerge.store.s3_local import LocalSeaweed

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # tests here import store_test_helpers (plain functions, no fixtures)

from pg_server import PgServer  # noqa: E402


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("store_worker", HERE / "store_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def worker() -> ModuleType:
    return load_worker()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the session (a fresh database per test: ``catalog_url``)."""
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite inside the store) or the URL of a fresh database on the session's PostgreSQL.

    Modules that set ``BOTH_CATALOGS = True`` run every test using ``store`` on both."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database(f"t_{uuid.uuid4().hex[:16]}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "catalog_url" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_CATALOGS", False):
        metafunc.parametrize("catalog_url", ["sqlite", "postgresql"], indirect=True)
    if "store_url" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_BACKENDS", False):
        metafunc.parametrize("store_url", ["local", "s3"], indirect=True)


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    """One real SeaweedFS S3 gateway for the session (a fresh bucket per test: ``store_url``)."""
    server = LocalSeaweed(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store directory, or ``s3://<fresh bucket>/store`` on the session's SeaweedFS (with its
    credentials in the environment). Modules that set ``BOTH_BACKENDS = True`` run on both."""
    if getattr(request, "param", "local") == "local":
        return str(tmp_path / "store")
    server: LocalSeaweed = request.getfixturevalue("seaweed_server")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{server.create_bucket(f't-{uuid.uuid4().hex[:20]}')}/store"


@pytest.fixture
def store(tmp_path: Path, catalog_url: str | None, store_url: str) -> Iterator[ModelStore]:
    s = ModelStore.open(store_url, catalog=catalog_url, cache_dir=tmp_path / "s3-cache")
    yield s
    s.close()


class ForkServer:
    """Client side of ``store_worker.py``'s line protocol."""

    def __init__(self, store_path: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "store_worker.py"), str(store_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pending: list[str] = []
        assert self.readline() == "server ready"

    def readline(self) -> str:
        if self.pending:
            return self.pending.pop(0)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with {self.proc.poll()}")
        return line.strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def spawn(self, command: str) -> int:
        """Fork a child running ``command``; lines it prints before the reply stay queued."""
        self.send(command)
        early: list[str] = []
        while True:
            line = self.readline()
            if line.startswith("pid "):
                self.pending = early + self.pending
                return int(line.split()[1])
            early.append(line)

    def wait_for(self, prefix: str) -> str:
        """Read (dropping nothing else's lines: they are requeued) until a line starts with ``prefix``."""
        skipped: list[str] = []
        while True:
            line = self.readline()
            if line.startswith(prefix):
                self.pending = skipped + self.pending
                return line
            skipped.append(line)

    def reap(self, pid: int) -> tuple[int, list[str]]:
        """Wait until child ``pid`` is gone; return (exit status, every line it printed)."""
        self.send(f"wait {pid}")
        lines: list[str] = []
        rest: list[str] = []
        while True:
            line = self.readline()
            parts = line.split()
            if parts[:2] == ["exit", str(pid)]:
                self.pending = rest + self.pending
                return int(parts[2]), lines
            (lines if len(parts) > 1 and parts[1] == str(pid) else rest).append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            self.proc.wait(timeout=30)


@pytest.fixture
def fork_server(tmp_path: Path, worker: ModuleType) -> Iterator[tuple[ForkServer, Path]]:
    path = tmp_path / "store"
    with ModelStore.open(path) as s:
        s.commit_base(worker.base_weights(), name="crash-test-base")
    server = ForkServer(path)
    yield server, path
    server.close()
