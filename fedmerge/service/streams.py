"""Guards of the client-streaming calls (``SubmitExpert``, ``Upload``): an idle timeout and a
per-client cap on concurrent streams.

:class:`IdleGuard` reads a gRPC request iterator in a helper thread that feeds a one-slot queue; the
handler takes messages with a timed get, so a stream that delivers no message for ``timeout_s``
seconds raises :class:`StreamIdleTimeout` (the servicer aborts the call with ``DEADLINE_EXCEEDED``).
The helper thread ends when the iterator ends or raises — gRPC ends it when the call ends (status
sent, client gone) — and never blocks on a handler that stopped taking messages (it polls
:meth:`IdleGuard.close`). Memory: at most two messages (one queued, one in the helper's hands).

:class:`StreamSlots` counts each client's open streams; opening one more than ``limit`` raises
:class:`TooManyStreams` at once (``RESOURCE_EXHAUSTED``, which clients retry), so one client holds at
most ``limit`` of the server's ``max_workers`` handler threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Generic, TypeVar

from fedmerge.errors import FedMergeError
from fedmerge.service.intake import QuotaExceeded

T = TypeVar("T")

THREAD_PREFIX = "fedmerge-stream-reader"
_ITEM, _END, _ERROR = "item", "end", "error"
_PUT_POLL_S = 0.1


class StreamIdleTimeout(FedMergeError, TimeoutError):
    """A client stream delivered no message within ``stream_idle_timeout_s``; the call is dropped."""


class TooManyStreams(QuotaExceeded):
    """A client already has ``limits.max_concurrent_streams`` streams open (retryable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class IdleGuard(Generic[T]):
    """Iterate ``source`` with at most ``timeout_s`` seconds between messages (see module docstring).

    ``hint`` ends the :class:`StreamIdleTimeout` message (what the client should do). Use as a
    context manager, or call :meth:`close` when the handler is done with the stream.
    """

    def __init__(self, source: Iterator[T], timeout_s: float, *, call: str, hint: str) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.call = call
        self.hint = hint
        self._source = source
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._finished = False
        self.thread = threading.Thread(target=self._pump, name=f"{THREAD_PREFIX}-{call}", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ helper thread
    def _pump(self) -> None:
        try:
            for item in self._source:
                if not self._put((_ITEM, item)):
                    return
        except BaseException as exc:  # handed to the handler thread and re-raised there
            self._put((_ERROR, exc))
            return
        self._put((_END, None))

    def _put(self, entry: tuple[str, object]) -> bool:
        """Queue ``entry`` unless the guard was closed meanwhile; False once closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------ handler side
    def __iter__(self) -> IdleGuard[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        try:
            kind, value = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            self._finished = True
            self.close()
            raise StreamIdleTimeout(
                f"{self.call} stream sent no message for {self.timeout_s:g} s (the server's "
                f"stream_idle_timeout_s, --stream-idle-timeout-s on serve-continual); the call was "
                f"dropped — {self.hint}"
            ) from None
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self._finished = True
        if kind == _ERROR:
            assert isinstance(value, BaseException)
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop feeding the queue; the helper exits at its next put or when ``source`` ends."""
        self._closed.set()

    def __enter__(self) -> IdleGuard[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class StreamSlots:
    """Per-client count of open streams, at most ``limit`` each (thread-safe)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {limit!r}")
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open_streams(self, client: str) -> int:
        with self._lock:
            return self._open.get(client, 0)

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """Hold one of ``client``'s slots for the ``with`` body; :class:`TooManyStreams` if none is free."""
        with self._lock:
            held = self._open.get(client, 0)
            if held >= self.limit:
                raise TooManyStreams(
                    f"client {client!r} already has {held} streams open (limit {self.limit}: "
                    "limits.max_concurrent_streams, --max-concurrent-streams); retry once one of them "
                    "has ended"
                )
            self._open[client] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open[client] - 1
                if left:
                    self._open[client] = left
                else:
                    del self._open[client]
