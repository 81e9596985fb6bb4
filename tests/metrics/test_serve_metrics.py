"""``fedmerge serve --metrics-port --dashboard-port`` end to end: a real SuperLink started by
``fedmerge serve``, two SuperNodes, ``flwr run`` for one round; the endpoint of the serve process (not
of the ServerApp process the SuperLink starts for the run) counts exactly that round, and the dashboard
lists its version."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "flower"))
sys.path.insert(0, str(Path(__file__).parent))

from metrics_helpers import scrape, value
from test_deployment import BIN, Deployment, deployment_env, free_port, run_flwr, wait_for_port

from fedmerge.metrics import REPLY_REASONS
from fedmerge.store import ModelStore

CONNECTION = "fedmerge-metrics"


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(*deployment_env(tmp_path))
    yield deployment
    deployment.stop()


def _printed(log: Path, prefix: str) -> str:
    import time

    end = time.monotonic() + 60
    while time.monotonic() < end:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        time.sleep(0.1)
    raise TimeoutError(f"no {prefix!r} in {log}: {log.read_text()[-2000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_serve_counts_the_rounds_of_a_run_it_did_not_run_itself(tmp_path: Path, dep: Deployment) -> None:
    port = free_port()
    store = tmp_path / "store"
    (Path(dep.env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    serve = dep.start(
        "serve",
        [str(BIN / "fedmerge"), "serve", "--store", str(store), "--insecure", "--no-supernode-auth",
         "--port", str(port), "--metrics-port", "0", "--dashboard-port", "0", "--create-store"],
    )  # fmt: skip
    wait_for_port(port, serve, 60)
    metrics_url = _printed(dep.logs / "serve.log", "serving metrics on ")
    dashboard_url = _printed(dep.logs / "serve.log", "serving dashboard on ")
    before = scrape(metrics_url)
    for i in range(2):
        dep.start(
            f"supernode{i}",
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--insecure",
             "--port", str(free_port()),
             "--node-config", f'partition-id={i} num-partitions=2 client-id="inst-{i}"'],
        )  # fmt: skip
    run_config = f"store='{store}' num-rounds=1 min-clients=2 min-valid=2 local-epochs=1 server-eval=false"
    result = run_flwr(dep, ["run", ".", CONNECTION, "--stream", "--run-config", run_config], 300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + dep.tail()
    after = scrape(metrics_url)
    with ModelStore.open(store) as st:
        version = st.get("latest")
    assert version.round == 1, dep.tail()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("fedmerge_rounds_completed_total") == 1, dep.tail()
    assert moved("fedmerge_round_replies_accepted_total") == version.metrics["accepted"] == 2
    assert sum(moved("fedmerge_round_replies_rejected_total", reason=r) for r in REPLY_REASONS) == 0
    assert moved("fedmerge_uplink_bytes_total") == version.metrics["uplink-bytes"] > 0
    assert moved("fedmerge_downlink_bytes_total") == version.metrics["downlink-bytes"] > 0
    assert value(after, "fedmerge_last_committed_version_info", version=version.id) == 1
    with urllib.request.urlopen(dashboard_url + "/versions", timeout=30) as resp:
        assert resp.status == 200 and version.id in resp.read().decode()


def test_serve_refuses_a_remote_metrics_host_before_starting_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedmerge.flower.cli import app as flower_cli
    from fedmerge.flower.server.serve import default_state_dir

    store = tmp_path / "store"
    args = ["serve", "--store", str(store), "--insecure", "--no-supernode-auth", "--port", str(free_port()),
            "--metrics-port", "0", "--metrics-host", "0.0.0.0"]  # fmt: skip
    result = CliRunner().invoke(flower_cli, args)
    assert result.exit_code == 2 and "--metrics-allow-remote" in result.output, result.output
    assert not store.exists() and not default_state_dir(store).exists()
