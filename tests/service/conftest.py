"""Fixtures of the service tests (helpers live in service_helpers.py, importable from the tests)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from service_helpers import make_store, server_config

from fedmerge.service.config import Limits
from fedmerge.service.server import IntakeServer


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return make_store(tmp_path)


@pytest.fixture
def server(store_dir: Path) -> Iterator[IntakeServer]:
    srv = IntakeServer(server_config(store_dir, limits=Limits(max_submission_bytes=1 << 20, max_queued=64)))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=0.5)
