"""The command line: ``push`` against a running server (real subprocess), JSON output, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service_helpers import TOKEN, base_weights, target, write_expert

from fedmerge.service.server import IntakeServer


def _push(server: IntakeServer, path: Path, token: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "fedmerge.service.cli",
        "push",
        str(path),
        "--server",
        target(server),
        "--json",
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={"FEDMERGE_TOKEN": token, "PATH": ""}
    )


def test_push_prints_the_merged_version(server: IntakeServer, tmp_path: Path) -> None:
    result = _push(server, write_expert(tmp_path, base_weights(), 1), TOKEN)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["state"] == "merged" and out["version"].startswith("v") and not out["duplicate"]


def test_push_with_a_bad_token_fails_cleanly(server: IntakeServer, tmp_path: Path) -> None:
    result = _push(server, write_expert(tmp_path, base_weights(), 2), "not-a-valid-token-at-all")
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr


def _serve_continual(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedmerge.service.cli", "serve-continual", "--allow-insecure", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_an_s3_endpoint_for_a_directory_store_is_one_line(tmp_path: Path) -> None:
    result = _serve_continual("--store", str(tmp_path / "store"), "--s3-endpoint", "http://127.0.0.1:9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "s3_endpoint" in result.stderr and "s3://bucket/prefix" in result.stderr
    assert not (tmp_path / "store").exists()


def test_an_unreachable_object_store_is_one_line(tmp_path: Path) -> None:
    result = _serve_continual(
        "--store", "s3://models/store", "--s3-endpoint", "http://127.0.0.1:9",
        "--data-dir", str(tmp_path / "data"), "--base-weights", str(tmp_path / "none.safetensors"),
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "unreachable" in result.stderr and "s3://models/store" in result.stderr
