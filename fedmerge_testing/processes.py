"""Ending the processes a test or a benchmark started: politely first, then for sure."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import psutil


def end_processes(procs: Sequence[psutil.Process], grace_s: float) -> None:
    """SIGTERM every process of ``procs`` and SIGKILL those still alive after ``grace_s`` s
    (``grace_s`` = 0: SIGKILL at once); returns when all have exited (or 10 s more have passed)."""
    alive = list(procs)
    if grace_s > 0:
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def end_tree(pid: int, grace_s: float) -> None:
    """:func:`end_processes` on the process ``pid`` and all its descendants (nothing if it is gone)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        end_processes([*root.children(recursive=True), root], grace_s)
