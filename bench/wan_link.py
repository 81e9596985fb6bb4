"""A simulated wide-area link for benchmarks: a localhost TCP proxy per node with a token bucket per
direction, so every byte a node exchanges with the server (Flower's SuperLink and fedmerge's bulk
endpoint alike) crosses one link of a fixed bandwidth.

:class:`TokenBucket` is the generic cell rate algorithm (GCRA) in bytes: a link of ``R`` bits/s with
a burst allowance of ``B`` bytes lets a chunk of ``n`` bytes reserved at ``now`` leave at

    tat ← max(tat, now) + 8·n / R ;   leave = max(now, tat − 8·B / R)

(``tat``: the theoretical arrival time of the link's next idle moment). ``N`` bytes sent back to
back from an idle link therefore take ``8·N / R − 8·B / R`` seconds, and an idle link never banks
more than ``B`` bytes of credit: the long-run rate is ``R`` whatever the chunking.

:class:`NodeLink` is one node's link: one bucket per direction (shared by all its connections, as one
access line is), any number of forwarded targets (:meth:`NodeLink.forward` listens on a free loopback
port and relays each accepted connection to the target), byte counters, and a log of the upstream
reads ``(time.time(), bytes)`` from which :func:`burst_start` and :func:`burst_end` find when an
upload began and when its last bytes crossed the link.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CHUNK_BYTES = 64 << 10
LOG_LIMIT = 1 << 20  # upstream reads kept in the log (a read is ≤ 64 KiB: 64 GiB of uploads)


@dataclass
class TokenBucket:
    """A link of ``rate_bps`` bits/s with ``burst_bytes`` of burst allowance (GCRA; module docstring).
    Thread-safe: the connections of one node share its bucket."""

    rate_bps: float
    burst_bytes: int = CHUNK_BYTES
    _tat: float = field(default=float("-inf"), init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.rate_bps > 0:
            raise ValueError(f"link rate must be > 0 bits/s, got {self.rate_bps}")
        if self.burst_bytes < 0:
            raise ValueError(f"burst must be ≥ 0 bytes, got {self.burst_bytes}")

    def reserve(self, nbytes: int, now: float) -> float:
        """Reserve ``nbytes`` of the link at time ``now``; the moment they may be sent (≥ ``now``)."""
        with self._lock:
            self._tat = max(self._tat, now) + 8.0 * nbytes / self.rate_bps
            return max(now, self._tat - 8.0 * self.burst_bytes / self.rate_bps)


def burst_start(
    reads: Sequence[tuple[float, int]], after: float, *, window_s: float = 1.0, min_bytes: int = 256 << 10
) -> float | None:
    """The time of the first read at or after ``after`` that opens a burst: at least ``min_bytes``
    read within ``window_s`` from it (so the small keep-alive and polling requests a node sends
    anyway are not taken for the start of its upload). ``reads``: ``(time, bytes)`` in time order."""
    j = 0
    total = 0
    for i, (t, _) in enumerate(reads):
        while j < len(reads) and reads[j][0] <= t + window_s:
            total += reads[j][1]
            j += 1
        if t >= after and total >= min_bytes:
            return t
        total -= reads[i][1]
    return None


def burst_end(
    reads: Sequence[tuple[float, int]], start: float, until: float, *, min_read: int = 4096
) -> float | None:
    """The time of the last read of at least ``min_read`` bytes in ``[start, until]`` (an upload's
    last bytes when ``until`` is the moment its reply reached the server: the small requests a node
    sends anyway are left out, and a transport that pauses between its chunks is not cut short).
    None when there is no such read."""
    end = None
    for t, n in reads:
        if start <= t <= until and n >= min_read:
            end = t
    return end


class NodeLink:
    """One node's simulated access line: forwarded targets sharing an up and a down bucket."""

    def __init__(self, rate_bps: float, burst_bytes: int = CHUNK_BYTES, host: str = "127.0.0.1") -> None:
        self.up = TokenBucket(rate_bps, burst_bytes)
        self.down = TokenBucket(rate_bps, burst_bytes)
        self.host = host
        self.bytes_up = 0
        self.bytes_down = 0
        self.up_reads: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False

    def forward(self, target: tuple[str, int]) -> int:
        """Listen on a free port of ``host`` and relay each connection to ``target``; the port."""
        listener = socket.create_server((self.host, 0))
        self._track(listener)
        threading.Thread(target=self._accept, args=(listener, target), daemon=True).start()
        return int(listener.getsockname()[1])

    def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> NodeLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            if self._closed:
                s.close()
                raise OSError("link closed")
            self._sockets.append(s)

    def _accept(self, listener: socket.socket, target: tuple[str, int]) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                self._track(client)
                server = socket.create_connection(target)
                self._track(server)
            except OSError:
                with contextlib.suppress(OSError):
                    client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._pump, args=(client, server, self.up, self._count_up), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, self.down, self._count_down), daemon=True
            ).start()

    def _count_up(self, t: float, n: int) -> None:
        with self._lock:
            self.bytes_up += n
            if len(self.up_reads) < LOG_LIMIT:
                self.up_reads.append((t, n))

    def _count_down(self, t: float, n: int) -> None:
        with self._lock:
            self.bytes_down += n

    @staticmethod
    def _pump(
        src: socket.socket, dst: socket.socket, bucket: TokenBucket, count: Callable[[float, int], None]
    ) -> None:
        try:
            while True:
                data = src.recv(CHUNK_BYTES)
                if not data:
                    break
                count(time.time(), len(data))
                now = time.monotonic()
                wait = bucket.reserve(len(data), now) - now
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
