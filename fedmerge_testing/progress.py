"""Waiting on a real deployment by the progress it makes, not by a fixed wall-clock guess.

A command (``flwr run``, ``fedmerge store export``…) runs until it exits; it is ended only when it has
made **no progress for** ``idle_s`` seconds. Progress is any new byte in its own output (``flwr run
--stream`` prints the ServerApp's and ClientApps' logs as they happen) or any change (size, mtime,
file count) under a watched path — the model store (a committed round), a deployment's log folder.
On a loaded machine a slow round therefore keeps its run alive, while a hung one is still stopped
after ``idle_s`` of silence; ``max_s`` (default 10 × ``idle_s``) bounds a run that keeps printing
without ever ending. When it is ended, :class:`NoProgress` says for how long nothing moved, what moved
last, and the tail of its output.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from fedmerge_testing.processes import end_tree


class NoProgress(AssertionError):
    """A watched command showed no progress for its idle window (or ran past its cap)."""


def fingerprint(path: Path) -> tuple[int, int, int]:
    """(file count, total bytes, newest mtime in ns) of a file or of everything under a directory."""
    if not path.exists():
        return (0, 0, 0)
    if path.is_file():
        st = path.stat()
        return (1, st.st_size, st.st_mtime_ns)
    count = size = newest = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))
                count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return (count, size, newest)


def run_watched(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    idle_s: float,
    watch: Sequence[Path] = (),
    max_s: float | None = None,
    poll_s: float = 0.5,
    merge_stderr: bool = False,
    output_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end like ``subprocess.run(capture_output=True, text=True)``, ending it (and its
    children, by pid) only after ``idle_s`` seconds without progress (module docstring) or past ``max_s``.

    Raises NoProgress then; otherwise returns the completed process whatever its exit code. With
    ``merge_stderr`` stderr goes to stdout in the order written (``stderr`` is then empty); with
    ``output_file`` stdout is written there as it comes (kept for a post-mortem even if the test is
    interrupted) instead of an anonymous temporary file.
    """
    cap = 10 * idle_s if max_s is None else max_s
    stdout = output_file.open("w+b") if output_file is not None else tempfile.TemporaryFile()  # noqa: SIM115
    with stdout as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if merge_stderr else err
        )
        start = last = time.monotonic()
        seen = (
            os.fstat(out.fileno()).st_size,
            os.fstat(err.fileno()).st_size,
            [fingerprint(p) for p in watch],
        )
        moved = "start"
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                now = time.monotonic()
                state = (
                    os.fstat(out.fileno()).st_size,
                    os.fstat(err.fileno()).st_size,
                    [fingerprint(p) for p in watch],
                )
                if state != seen:
                    changed = [str(p) for p, a, b in zip(watch, seen[2], state[2], strict=True) if a != b]
                    moved = ", ".join(changed) if changed else "its output"
                    seen, last = state, now
                if now - last > idle_s or now - start > cap:
                    end_tree(proc.pid, grace_s=0)
                    proc.wait()
                    out.seek(0)
                    err.seek(0)
                    tail = (out.read().decode(errors="replace") + err.read().decode(errors="replace"))[-3000:]
                    why = (
                        f"no progress for {now - last:.0f} s (idle window {idle_s:.0f} s)"
                        if now - last > idle_s
                        else f"still running after the cap of {cap:.0f} s"
                    )
                    raise NoProgress(
                        f"{' '.join(argv[:3])} ended: {why}; ran {now - start:.0f} s, last progress "
                        f"{now - last:.0f} s ago ({moved})\n{tail}"
                    )
        finally:
            if proc.poll() is None:
                end_tree(proc.pid, grace_s=0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            list(argv),
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (0 when it is gone)."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


def _exited(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie not yet reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    pid: int,
    idle_s: float,
    max_s: float | None = None,
    poll_s: float = 0.2,
    min_cpu_s: float = 0.05,
) -> None:
    """Return once ``condition()`` holds; NoProgress when the process ``pid`` (and its children) has
    spent less than ``min_cpu_s`` of CPU in the last ``idle_s`` seconds, has exited, or ``max_s``
    (default 10 × ``idle_s``) has passed. ``what`` names the condition in the message."""
    cap = 10 * idle_s if max_s is None else max_s
    start = last = time.monotonic()
    cpu = tree_cpu_seconds(pid)
    while not condition():
        now = time.monotonic()
        if _exited(pid):
            if condition():  # it came true as the process ended, between the two checks
                return
            raise NoProgress(f"{what}: process {pid} exited after {now - start:.0f} s")
        used = tree_cpu_seconds(pid)
        if used - cpu >= min_cpu_s:
            cpu, last = used, now
        if now - last > idle_s or now - start > cap:
            raise NoProgress(
                f"{what}: not after {now - start:.0f} s; process {pid} used no CPU for {now - last:.0f} s "
                f"(idle window {idle_s:.0f} s, cap {cap:.0f} s)"
            )
        time.sleep(poll_s)
