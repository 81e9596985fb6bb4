"""The progress-based wait of the deployment tests (``progress.run_watched``): a command that keeps
moving outlives its idle window many times over; a silent one is ended after it, with its children.
(Shell loops: they start in milliseconds even on a loaded machine.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fedmerge_testing.progress import NoProgress, run_watched, wait_until


def test_a_command_that_keeps_printing_outlives_its_idle_window(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = run_watched(["bash", "-c", "for i in $(seq 12); do echo $i; sleep 0.5; done"], cwd=tmp_path,
                         env=dict(os.environ), idle_s=2.5, poll_s=0.1)  # fmt: skip
    assert result.returncode == 0 and result.stdout.split() == [str(i) for i in range(1, 13)]
    assert time.monotonic() - t0 > 2 * 2.5  # ran past twice the idle window, never ended


def test_changes_under_a_watched_path_count_as_progress(tmp_path: Path) -> None:
    target = tmp_path / "store"
    target.mkdir()
    script = f"for i in $(seq 10); do touch {target}/f$i; sleep 0.5; done"
    result = run_watched(
        ["bash", "-c", script], cwd=tmp_path, env=dict(os.environ), idle_s=2.5, watch=[target], poll_s=0.1
    )
    assert result.returncode == 0 and len(list(target.iterdir())) == 10


def test_a_silent_command_and_its_children_are_ended_after_the_idle_window(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; echo started; sleep 300"
    t0 = time.monotonic()
    with pytest.raises(NoProgress, match=r"no progress for \d+ s \(idle window 2 s\)(.|\n)*started"):
        run_watched(["bash", "-c", script], cwd=tmp_path, env=dict(os.environ), idle_s=2, poll_s=0.1)
    assert time.monotonic() - t0 < 120
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_command_that_prints_forever_stops_at_the_cap(tmp_path: Path) -> None:
    with pytest.raises(NoProgress, match="cap of 3 s"):
        run_watched(["bash", "-c", "while true; do echo .; sleep 0.1; done"], cwd=tmp_path,
                    env=dict(os.environ), idle_s=2, max_s=3, poll_s=0.1)  # fmt: skip


def test_wait_until_waits_while_the_process_works_and_stops_when_it_idles(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    # busy for ~8 s (CPU), then ready: longer than the idle window, yet never idle
    script = f"end=$((SECONDS + 8)); while [ $SECONDS -lt $end ]; do :; done; touch {flag}; sleep 60"
    busy = subprocess.Popen(["bash", "-c", script])
    try:
        wait_until(flag.exists, "ready", pid=busy.pid, idle_s=5.0)
    finally:
        busy.kill()
        busy.wait()
    idle = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(NoProgress, match="used no CPU"):
            wait_until(lambda: False, "never", pid=idle.pid, idle_s=1.0)
    finally:
        idle.kill()
        idle.wait()
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(NoProgress, match="exited"):
        wait_until(lambda: False, "never", pid=gone.pid, idle_s=5.0)


def test_a_condition_that_came_true_as_the_process_ended_is_met() -> None:
    """The process exits between a false check and the exit check (a fuzzing run that ends on time,
    say): the condition is checked once more, and holds, so that is not a failure."""
    ended = subprocess.Popen(["true"])
    while psutil.Process(ended.pid).status() != psutil.STATUS_ZOMBIE:  # ended, not reaped
        time.sleep(0.01)
    calls = []

    def done() -> bool:  # false when first asked, true once the process is seen to have ended
        calls.append(1)
        return len(calls) > 1

    try:
        wait_until(done, "the run", pid=ended.pid, idle_s=5.0)
    finally:
        ended.wait()
    assert len(calls) == 2
