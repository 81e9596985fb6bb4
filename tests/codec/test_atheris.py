"""A bounded coverage-guided fuzzing run (atheris, ``fuzz/decode_package.py``) of the package decoder:
every input must decode or raise an InvalidSubmission; anything else makes libFuzzer exit non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")
ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_atheris_finds_no_uncaught_exception_in_the_decoder(tmp_path: Path) -> None:
    fuzzer = str(ROOT / "fuzz" / "decode_package.py")
    proc = subprocess.run(
        [sys.executable, fuzzer, "-max_total_time=60", "-seed=1", str(tmp_path)],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DONE" in proc.stderr and "cov:" in proc.stderr
    assert len(list(tmp_path.iterdir())) > 6  # the six seeds plus inputs that reached new coverage
