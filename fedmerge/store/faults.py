"""Fault injection for crash tests: die by a real SIGKILL at a chosen write step.

The store calls :meth:`FaultPoints.reached` between its write steps (after each blob, after the
manifest, inside the catalog transaction...). With the environment variable
``FEDMERGE_STORE_KILL_AT=N`` set when the store is opened, the process sends itself ``SIGKILL`` at
the N-th step it reaches (0-based, counted across commits). Unset (the default), a step costs one
integer comparison. Nothing else in the store reads this variable.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "FEDMERGE_STORE_KILL_AT"


class FaultPoints:
    """Counts write steps; SIGKILLs the current process at step ``kill_at`` when one is set."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.count = 0

    @staticmethod
    def from_env() -> FaultPoints:
        raw = os.environ.get(KILL_AT_ENV)
        return FaultPoints(int(raw) if raw not in (None, "") else None)

    def reached(self, step: str) -> None:
        """Mark that write step ``step`` is done (the name documents the call site)."""
        if self.kill_at is not None and self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.count += 1
