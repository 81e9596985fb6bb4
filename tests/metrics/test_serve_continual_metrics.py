"""``serve-continual --metrics-port``: scrape the real endpoint of a real server process after real pushes.

One valid expert (merged), one invalid one (acknowledged, then rejected by the merge worker), the valid
one again (a duplicate), one over the size limit (refused before acknowledgement) and a call with an
unknown token: every counter must move by exactly what happened, the bytes by exactly what travelled.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).parent))

from metrics_helpers import scrape, tree_bytes, value, wait_for_url
from service_helpers import (
    TOKEN,
    ServerProcess,
    base_weights,
    finetuned,
    make_store,
    write_expert,
    write_tokens,
)

from fedmerge.service.client import (
    ClientOptions,
    ServiceCallError,
    download_version,
    submit_expert,
    wait_merged,
)
from fedmerge.v1 import intake_pb2

LIMIT = 64 << 10  # --max-submission-bytes of the server under test


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    store = make_store(tmp_path)
    proc = ServerProcess(
        store, write_tokens(tmp_path / "tokens.txt"), tmp_path / "server.log",
        "--metrics-port", "0", "--max-submission-bytes", str(LIMIT),
    )  # fmt: skip
    proc.start()
    try:
        yield proc, wait_for_url(tmp_path / "server.log")
    finally:
        proc.stop()


def test_counters_move_by_exactly_what_happened(served: tuple[ServerProcess, str], tmp_path: Path) -> None:
    proc, url = served
    opts = ClientOptions(f"127.0.0.1:{proc.port}", token=TOKEN)
    before = scrape(url)
    assert url.startswith("http://127.0.0.1:")

    good = write_expert(tmp_path, base_weights(), 1)
    bad_weights = finetuned(base_weights(), 2)
    bad_weights["l1.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(bad_weights, str(bad))
    merged = wait_merged(opts, submit_expert(opts, good).submission_id, timeout=60)
    rejected = wait_merged(opts, submit_expert(opts, bad).submission_id, timeout=60)
    assert merged.state == intake_pb2.SUBMISSION_STATE_MERGED
    assert rejected.state == intake_pb2.SUBMISSION_STATE_REJECTED
    assert submit_expert(opts, good).duplicate
    with pytest.raises(ServiceCallError, match="FAILED_PRECONDITION"):
        submit_expert(opts, b"\0" * (LIMIT + 1), fmt="delta_package")
    with pytest.raises(ServiceCallError, match="UNAUTHENTICATED"):
        submit_expert(ClientOptions(opts.target, token="not-a-known-token-at-all"), good)
    out = tmp_path / "downloaded.safetensors"
    download_version(opts, merged.version, out)

    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("fedmerge_intake_acknowledged_total") == 2
    assert moved("fedmerge_intake_duplicates_total") == 1
    assert moved("fedmerge_intake_refused_total", reason="quota") == 1
    assert moved("fedmerge_intake_refused_total", reason="invalid") == 0
    assert moved("fedmerge_rpc_unauthenticated_total") == 1
    assert moved("fedmerge_submissions_total", outcome="merged") == 1
    assert moved("fedmerge_submissions_total", outcome="rejected") == 1
    assert moved("fedmerge_submissions_total", outcome="failed") == 0
    assert moved("fedmerge_merge_latency_seconds_count") == 1
    assert moved("fedmerge_versions_committed_total") == 1
    # the payload bytes that crossed the wire: two experts and the duplicate up, one version down
    sent = 2 * good.stat().st_size + bad.stat().st_size
    assert moved("fedmerge_uplink_bytes_total") == sent
    assert moved("fedmerge_downlink_bytes_total") == out.stat().st_size
    assert value(after, "fedmerge_intake_queue_depth") == 0
    assert value(after, "fedmerge_last_committed_version_info", version=merged.version) == 1
    assert value(after, "fedmerge_last_committed_round") == 1
    # nothing of the rounds moved on an intake server
    assert moved("fedmerge_rounds_completed_total") == 0
    low = tree_bytes(proc.store)
    size = value(scrape(url), "fedmerge_store_size_bytes")
    high = tree_bytes(proc.store)
    assert min(low, high) - 65536 <= size <= max(low, high) + 65536 and size > 0


def test_a_remote_metrics_host_is_refused_without_the_flag(tmp_path: Path) -> None:
    import subprocess

    store = make_store(tmp_path)
    cmd = [
        sys.executable, "-m", "fedmerge.service.cli", "serve-continual", "--store", str(store),
        "--listen", "127.0.0.1:0", "--tokens", str(write_tokens(tmp_path / "tokens.txt")),
        "--metrics-port", "0", "--metrics-host", "0.0.0.0",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metrics-allow-remote" in lines[0], result.stderr


def test_dashboard_is_served_beside_the_intake(tmp_path: Path) -> None:
    import urllib.request

    store = make_store(tmp_path)
    log = tmp_path / "server.log"
    proc = ServerProcess(store, write_tokens(tmp_path / "tokens.txt"), log, "--dashboard-port", "0")
    proc.start()
    try:
        opts = ClientOptions(f"127.0.0.1:{proc.port}", token=TOKEN)
        merged = wait_merged(
            opts, submit_expert(opts, write_expert(tmp_path, base_weights(), 3)).submission_id, timeout=60
        )
        url = _printed(log, "serving dashboard on ")
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/versions", timeout=30) as resp:
            assert resp.status == 200 and merged.version in resp.read().decode()
        with urllib.request.urlopen(url + "/intake", timeout=30) as resp:
            assert resp.status == 200
    finally:
        proc.stop()


def test_a_remote_dashboard_needs_an_operator_token(tmp_path: Path) -> None:
    import subprocess

    store = make_store(tmp_path)
    cmd = [
        sys.executable, "-m", "fedmerge.service.cli", "serve-continual", "--store", str(store),
        "--listen", "127.0.0.1:0", "--tokens", str(write_tokens(tmp_path / "tokens.txt")),
        "--dashboard-port", "0", "--dashboard-host", "0.0.0.0",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "operator" in lines[0], result.stderr


def _printed(log: Path, prefix: str, timeout: float = 60.0) -> str:
    """The rest of the first line of ``log`` starting with ``prefix``."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        time.sleep(0.05)
    raise TimeoutError(f"no line {prefix!r} in {log}")


def test_a_remote_dashboard_takes_operator_tokens_only(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    store = make_store(tmp_path)
    tokens = write_tokens(tmp_path / "tokens.txt")
    operator_token = "operator-token-0123456789abcdef"
    tokens.write_text(tokens.read_text() + f"ops {operator_token} operator\n")
    log = tmp_path / "server.log"
    proc = ServerProcess(store, tokens, log, "--dashboard-port", "0", "--dashboard-host", "0.0.0.0")
    proc.start()
    try:
        url = _printed(log, "serving dashboard on ")

        def status(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(url + "/versions", headers=headers)) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert status(None) == 401
        assert status(TOKEN) == 401  # a client's token does not open every client's submissions
        assert status(operator_token) == 200
    finally:
        proc.stop()
