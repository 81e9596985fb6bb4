"""The command line as a user meets it: errors are one line on stderr and a non-zero exit code, never a
traceback (``--debug`` shows one); ``--version``; a typo gets one suggestion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedmerge import __version__


def fedmerge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_version_flag() -> None:
    out = fedmerge("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"fedmerge {__version__} (format 1)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("demo", "--aggregator", "tiez"), "'tiez' is not registered; choose one of"),
        (("demo", "--density", "2.0"), "density must be in (0, 1]"),
        (("demo", "--values", "int3"), "values must be one of fp32, fp16, bf16, int8, int4, sign"),
        (("demo", "--downlink-values", "int3"), "downlink-values='int3' must be one of"),
        (("demo", "--rank", "70000"), "CodecConfig.rank must be an int in [0, 65536]"),
        (("simulate", "missing.toml"), "missing.toml does not exist"),
    ],
)
def test_errors_are_one_line_without_traceback(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    out = (
        fedmerge(*args, "--store", str(tmp_path / "s"), cwd=tmp_path)
        if args[0] == "demo"
        else fedmerge(*args, cwd=tmp_path)
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = fedmerge("--debug", "simulate", "missing.toml", cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" in out.stderr
    assert "ConfigError" in out.stderr


def test_typo_gets_one_suggestion() -> None:
    out = fedmerge("stor")
    assert out.returncode == 2
    assert out.stderr.count("Did you mean 'store'?") == 1
