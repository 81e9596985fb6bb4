"""Reading an object of an S3-compatible store as a stream: :class:`RangeReader` (ranged GETs whose
bodies are read as the caller asks, straight into the caller's buffer) and the two steps on a
streamed answer it is built on, :func:`read_body_into` and :func:`release_body`. The blob backend
(:mod:`fedmerge.store.s3`) hands a :class:`RangeReader` out for blobs it does not cache."""

from __future__ import annotations

import contextlib
import http.client
import io
from collections.abc import Callable
from typing import Any

from fedmerge.store.s3_client import ObjectStoreError

READ_AHEAD = 8 << 20
"""Bytes the first ranged GET of a blob asks for (the whole of most tensors' blobs), and the least a
later one asks for."""
RANGE_BYTES = 64 << 20
"""Bytes a ranged GET after the first asks for at most (a tensor's bytes are read sequentially, as
they arrive: a long range costs no memory)."""
STREAM_BUFFER = 64 << 10
"""Buffer of the :class:`io.BufferedReader` over a :class:`RangeReader`: small reads (a header) come
from it, large ones go from the socket straight into the caller's buffer."""
STREAM_RETRIES = 3
"""Times a broken or short ranged answer is asked for again from where it stopped."""


def read_body_into(body: Any, view: memoryview) -> int:
    """Read the next bytes of a streamed response ``body`` (botocore's ``StreamingBody``) into ``view``;
    0 at its end.

    botocore's own ``readinto`` goes through urllib3, which reads into a new ``bytes`` object and
    then copies it into ``view`` while holding the GIL. When the body is the usual urllib3 response
    over an ``http.client`` response, the bytes are read from the socket straight into ``view``
    instead (the GIL released during the read) — the same route botocore takes to reach the socket
    for ``set_socket_timeout``. Anything else falls back to the body's own ``readinto``."""
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    if isinstance(fp, http.client.HTTPResponse):
        return fp.readinto(view) if not fp.isclosed() else 0
    return int(body.readinto(view))


def release_body(body: Any) -> None:
    """Be done with a streamed response ``body``: a body read to its end gives its connection back
    to the client's pool (kept open for the next request); one abandoned half-read closes its
    connection (the unread bytes would otherwise be taken for the next answer)."""
    raw: Any = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and fp.isclosed() and hasattr(raw, "release_conn"):
        raw.release_conn()
        return
    body.close()
    if hasattr(raw, "release_conn"):
        raw.release_conn()  # the closed connection's pool slot back: the pool reconnects on its next use


class RangeReader(io.RawIOBase):
    """A seekable raw reader of one object by HTTP ranges (wrap it in :class:`io.BufferedReader`).

    Sequential reads are served from one open answer: a ranged GET for the bytes from the read
    position on (at least :data:`READ_AHEAD`, up to :data:`RANGE_BYTES`) whose body is read as the
    caller asks, straight from the socket into the caller's buffer
    (:func:`read_body_into`), so the network, the caller's hashing and its
    writes overlap and no copy of the blob is held. A seek elsewhere abandons that answer (its
    connection is closed) and the next read asks for a new range. A stream that breaks or ends
    early (a reset connection, a read timeout) is asked again from where it stopped, up to
    :data:`STREAM_RETRIES` times, before one :class:`~fedmerge.store.s3_client.ObjectStoreError` line.
    Not thread-safe.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        size: int,
        fail: Callable[[BaseException, str], ObjectStoreError],
        body: Any = None,
        length: int = 0,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        self.size = size
        self._fail = fail  # the one-line error of a request still failing after botocore's retries
        self.pos = 0
        self._body = body  # an open answer serving bytes [_at, _end) of the blob, or None
        self._at = 0
        self._end = length if body is not None else 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(view.nbytes, self.size - self.pos)
        if n <= 0:
            return 0
        failure: BaseException | None = None
        for _ in range(STREAM_RETRIES + 1):
            if self._body is None or self._at != self.pos or self._at >= self._end:
                self._drop()
                self._open(self.pos, max(n, READ_AHEAD))
            try:
                got = read_body_into(self._body, view[: min(n, self._end - self._at)])
            except Exception as exc:  # a broken stream: ask again from here
                failure = exc
                self._drop()
                continue
            if not got:  # the answer ended before the bytes it promised
                self._drop()
                continue
            self._at += got
            self.pos += got
            if self._at >= self._end:
                self._drop()
            return got
        what = f"reading s3://{self.bucket}/{self.key} at byte {self.pos}"
        if failure is None:
            raise ObjectStoreError(
                f"{what}: the object store's answers kept ending early ({STREAM_RETRIES + 1} tries); "
                "check the object store's health"
            )
        raise self._fail(failure, what)

    def _open(self, start: int, least: int) -> None:
        """Ask for bytes [start, start + between ``least`` and :data:`RANGE_BYTES`) of the blob."""
        end = min(self.size, start + max(least, RANGE_BYTES))
        try:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}"
            )
        except Exception as exc:
            raise self._fail(exc, f"reading s3://{self.bucket}/{self.key}") from None
        self._body = answer["Body"]
        self._at = start
        self._end = start + int(answer.get("ContentLength") or 0)

    def _drop(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            with contextlib.suppress(Exception):
                release_body(body)

    def close(self) -> None:
        self._drop()
        super().close()
