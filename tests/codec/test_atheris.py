"""A bounded coverage-guided fuzzing run (atheris, ``fuzz/decode_package.py``) of the package decoder:
every input must decode or raise an InvalidSubmission; anything else makes libFuzzer exit non-zero.

The fuzzer instruments fedmerge's functions and compiles the decoder's kernels before the first
input, which takes minutes on a busy machine, so the test waits by the fuzzer's progress — the CPU its
process spends — not by a fixed wall-clock guess (``fedmerge_testing/progress.py``)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedmerge_testing.processes import end_tree
from fedmerge_testing.progress import wait_until

pytest.importorskip("atheris")
ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_atheris_finds_no_uncaught_exception_in_the_decoder(tmp_path: Path) -> None:
    fuzzer = str(ROOT / "fuzz" / "decode_package.py")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, fuzzer, "-max_total_time=60", "-seed=1", str(tmp_path / "corpus")],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            done = lambda: proc.poll() is not None  # noqa: E731
            wait_until(done, "the fuzzing run", pid=proc.pid, idle_s=120, max_s=3600)
        finally:
            if proc.poll() is None:
                end_tree(proc.pid, grace_s=0)
        err.seek(0)
        log = err.read().decode(errors="replace")
    assert proc.wait() == 0, log[-4000:]
    assert "DONE" in log and "cov:" in log
    assert len(list((tmp_path / "corpus").iterdir())) > 6  # the seeds plus inputs that reached new coverage
