"""The judge's check of a spooled package, run as soon as its bulk upload completes.

:class:`ArrivalChecks` holds, per round attempt, the check the judge registered
(:meth:`register`: decode of every tensor, its checksums, values and shapes), and runs it on its own
thread pool (:data:`VERIFY_WORKERS` packages at once, each package's tensors on several threads) when
the spool reports a completed upload (:meth:`completed`) — before the node's reply crosses Flower's
message path. Only the first object each node completes in a round attempt is checked, so a node
cannot make the server verify more than one package per round. The judge takes the result (or the
check's exception) once, with :meth:`take`; what no reply took is closed with the round attempt
(:meth:`close_attempt`) or when the endpoint stops (:meth:`stop`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Protocol

# packages verified at once as they complete (each on several threads, with at most
# spool_merge.CHECK_BYTES_IN_FLIGHT of decoded tensors): uploads that complete together are verified
# side by side instead of the last one waiting for the others (bench large: 1.5-1.7 s -> 0.5-0.6 s)
VERIFY_WORKERS = 2


class Closeable(Protocol):
    def close(self) -> None: ...


Verifier = Callable[[Path], Closeable]


def attempt_prefix(round_: int, attempt: int) -> str:
    """The prefix of every owner name of a round attempt (``round-R/attempt-A/node-N``)."""
    return f"round-{round_}/attempt-{attempt}/"


class ArrivalChecks:
    """Checks of completed uploads, keyed by (owner, sha256) (module docstring)."""

    def __init__(self) -> None:
        self._verifiers: dict[tuple[int, int], Verifier] = {}  # round attempt -> the judge's check
        self._started: dict[tuple[str, str], futures.Future[Closeable]] = {}  # (owner, sha256)
        self._owners: set[str] = set()  # owners whose first completed upload was taken up
        self._lock = threading.Lock()
        self._pool: futures.ThreadPoolExecutor | None = None

    def register(self, round_: int, attempt: int, verify: Verifier) -> None:
        """Run ``verify(path)`` on each node's first upload completed in this round attempt."""
        with self._lock:
            self._verifiers[(round_, attempt)] = verify

    def completed(self, owner: str, sha256: str, path: Path) -> None:
        """An upload of ``owner`` was published at ``path`` (called on a gRPC worker thread)."""
        try:
            round_, attempt, _ = (int(part.split("-", 1)[1]) for part in owner.split("/"))
        except (ValueError, IndexError):
            return
        with self._lock:
            verify = self._verifiers.get((round_, attempt))
            if verify is None or owner in self._owners:
                return
            self._owners.add(owner)
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(VERIFY_WORKERS, thread_name_prefix="fedmerge-verify")
            self._started[(owner, sha256)] = self._pool.submit(verify, path)

    def take(self, owner: str, sha256: str) -> futures.Future[Closeable] | None:
        """The check started when ``owner``'s upload of ``sha256`` completed, once; else None."""
        with self._lock:
            return self._started.pop((owner, sha256), None)

    def close_attempt(self, round_: int, attempt: int) -> None:
        """Forget the round attempt's check; close the results no reply took."""
        prefix = attempt_prefix(round_, attempt)
        with self._lock:
            self._verifiers.pop((round_, attempt), None)
            pending = [self._started.pop(k) for k in [k for k in self._started if k[0].startswith(prefix)]]
            self._owners = {o for o in self._owners if not o.startswith(prefix)}
        for fut in pending:  # verified (or being verified) but claimed by no reply
            discard(fut)

    def stop(self) -> None:
        """Close every result not taken and end the pool (waiting for a check that runs)."""
        with self._lock:
            pending = list(self._started.values())
            self._started.clear()
            self._verifiers.clear()
            pool, self._pool = self._pool, None
        for fut in pending:
            discard(fut)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _close_result(fut: futures.Future[Closeable]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def discard(fut: futures.Future[Closeable]) -> None:
    """Cancel a check not yet started, or close its result once it is done."""
    if not fut.cancel():
        fut.add_done_callback(_close_result)
