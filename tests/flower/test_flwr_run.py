"""``flwr run .``: the app as packaged from pyproject.toml, on a local SuperLink with the Ray engine."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedmerge.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]


def _processes_of(flwr_home: str) -> list[psutil.Process]:
    """Processes whose command line names this test's FLWR_HOME (the auto-started local SuperLink)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if flwr_home in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


@pytest.fixture
def local_superlink_cleanup() -> Iterator[None]:
    yield
    home = os.environ["FLWR_HOME"]
    procs = _processes_of(home)
    for proc in procs:
        children = proc.children(recursive=True)
        for p in [*children, proc]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.integration
@pytest.mark.slow
def test_flwr_run_simulation_commits_a_version_per_round(
    tmp_path: Path, local_superlink_cleanup: None
) -> None:
    store = tmp_path / "store"
    flwr = str(Path(sys.executable).with_name("flwr"))
    result = subprocess.run(
        [
            flwr,
            "run",
            ".",
            "--stream",
            "--run-config",
            f"store='{store}' num-rounds=2 min-clients=3",
            "--federation-config",
            "num-supernodes=4 client-resources-num-cpus=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with ModelStore.open(store) as st:
        versions = st.list()
        rounds = sorted(v.round for v in versions if v.round is not None)
        assert rounds == [1, 2]
        latest = st.get("latest")
        assert latest.method == "ties" and latest.round == 2
        assert sum(c.accepted for c in latest.contributors) >= 3
        assert latest.metrics["uplink-bytes"] < 0.1 * latest.metrics["uplink-dense-bytes"]
