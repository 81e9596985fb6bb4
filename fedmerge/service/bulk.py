"""Content-addressed, resumable bulk objects on the server: memory bounded by the chunk size.

An object is named by the sha256 of its bytes. Layout under ``root``::

    objects/<64 hex>                  a complete, verified object (read with :meth:`BulkStore.open`)
    partial/<owner>/<64 hex>.part     bytes one client received so far, appended in order

A partial upload belongs to the client that began it (``owner``: its client id; ``<owner>`` is a hash
of it): another client's ``begin`` of the same object — with any declared size — starts its own
partial upload and never truncates, resets or writes into the first one. Complete objects are
shared (their name is the verified hash of their bytes).

Protocol: :meth:`BulkStore.begin` returns how many bytes the server already holds (0 for a new
object, ``total_size`` for a complete one); the client streams the rest with :meth:`write`, each
chunk at the exact current offset; :meth:`finish` fsyncs, checks the size and the sha256 and renames
the partial file onto ``objects/``. A connection broken mid-way loses nothing already flushed:
``begin`` after a reconnect (or a server restart) resumes from the partial file's durable length.
The running sha256 is kept per upload in memory; after a restart it is rebuilt by re-reading the
partial file once. Chunks are written straight to the file, so a server holds one chunk per upload.

With ``track_owners=True`` the store also records who completed each object
(``owners/<64 hex>/<hash of owner>``, holding the owner's name): :meth:`BulkStore.owners` answers
whose upload produced it, so a reference can be refused when it names another client's object
(the federated rounds' spool uses this; the continual intake shares complete objects).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedmerge.errors import InvalidSubmission
from fedmerge.fsutil import fsync_dir

_SHA = re.compile(r"^[0-9a-f]{64}$")


class BulkError(InvalidSubmission):
    """A bulk upload was refused (bad name, size, offset or hash); bytes past the last good one dropped."""


class BulkBusyError(BulkError):
    """Another stream is uploading the same object right now; retry after it ends."""

    retryable = True


class UnknownObjectError(BulkError, KeyError):
    """No complete object has that content hash."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BulkStatus:
    sha256: str
    total_size: int
    offset: int
    complete: bool


def check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA.match(sha256):
        raise BulkError(f"{sha256!r} is not a lowercase sha256 hex digest (64 characters 0-9a-f)")
    return sha256


@dataclass
class _Upload:
    total_size: int
    hasher: hashlib._Hash
    offset: int
    fh: BinaryIO | None = None


class BulkStore:
    """Server-side bulk objects in a directory (see the module docstring)."""

    def __init__(
        self, root: str | os.PathLike[str], *, max_bytes: int = 8 << 30, track_owners: bool = False
    ) -> None:
        """Objects and partial uploads under ``root``; ``max_bytes`` bounds one object;
        ``track_owners`` records who completed each object (see :meth:`owners`)."""
        self.root = Path(root)
        self.track_owners = track_owners
        self.owner_dir = self.root / "owners"
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._busy: set[tuple[str, str]] = set()

    def part_path(self, sha256: str, owner: str = "") -> Path:
        """Where ``owner``'s partial upload of ``sha256`` is kept."""
        digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self.partial / digest / f"{check_sha(sha256)}.part"

    def _discard(self, part: Path) -> None:
        """Remove ``part`` and its owner's directory once that holds nothing (under the lock, so no
        stream is creating a file there meanwhile)."""
        with self._lock:
            part.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                part.parent.rmdir()

    # ---------------------------------------------------------------------------------- reading
    def path(self, sha256: str) -> Path:
        return self.objects / check_sha(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """A binary reader of the complete object ``sha256`` (raises :class:`UnknownObjectError`)."""
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise UnknownObjectError(
                f"no complete bulk object {sha256}; upload it first (fedmerge.service.client.upload_bulk)"
            ) from None

    def owners(self, sha256: str) -> set[str]:
        """The owners whose upload completed ``sha256`` (empty without ``track_owners``)."""
        folder = self.owner_dir / check_sha(sha256)
        if not folder.is_dir():
            return set()
        return {p.read_text("utf-8", "surrogateescape") for p in folder.iterdir() if p.is_file()}

    def partial_size(self, sha256: str, owner: str = "") -> int | None:
        """Bytes of ``owner``'s unfinished upload of ``sha256`` on disk, or None when there is none."""
        part = self.part_path(sha256, owner)
        try:
            return part.stat().st_size
        except FileNotFoundError:
            return None

    def _record_owner(self, sha256: str, owner: str) -> None:
        folder = self.owner_dir / sha256
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        tmp = folder / f".{digest}.tmp"
        tmp.write_text(owner, "utf-8", "surrogateescape")
        os.replace(tmp, folder / digest)
        fsync_dir(folder)

    # ---------------------------------------------------------------------------------- writing
    def begin(self, sha256: str, total_size: int, owner: str = "") -> BulkStatus:
        """Register (or resume) ``owner``'s upload of ``sha256``; returns the offset to continue from.

        The same owner declaring another size restarts its own upload; another owner's partial
        upload of the same object is never touched."""
        check_sha(sha256)
        if total_size <= 0 or total_size > self.max_bytes:
            raise BulkError(
                f"bulk object {sha256[:12]}… declares {total_size} bytes; the limit is {self.max_bytes} "
                "(1 byte minimum) — raise limits.max_bulk_bytes on the server or split the payload"
            )
        if self.has(sha256):
            size = self.path(sha256).stat().st_size
            return BulkStatus(sha256, size, size, True)
        key = (owner, sha256)
        with self._lock:
            up = self._uploads.get(key)
            if up is None or up.total_size != total_size:
                if key in self._busy:
                    raise BulkBusyError(
                        f"bulk object {sha256[:12]}… is being uploaded by another stream of this client; "
                        "retry Begin after it ends"
                    )
                up = self._resume(sha256, total_size, owner)
                self._uploads[key] = up
            return BulkStatus(sha256, total_size, up.offset, False)

    def _resume(self, sha256: str, total_size: int, owner: str) -> _Upload:
        part = self.part_path(sha256, owner)
        hasher = hashlib.sha256()
        offset = 0
        if part.exists():
            size = part.stat().st_size
            if size > total_size:
                part.unlink()
            else:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        hasher.update(block)
                offset = size
        return _Upload(total_size, hasher, offset)

    def acquire(self, sha256: str, owner: str = "") -> None:
        """Claim the right to write ``owner``'s upload of ``sha256`` (one stream at a time)."""
        key = (owner, sha256)
        with self._lock:
            if key in self._busy:
                raise BulkBusyError(f"bulk object {sha256[:12]}… is being uploaded by another stream; retry")
            if key not in self._uploads:
                raise BulkError(f"bulk object {sha256[:12]}… was not begun; call Begin first")
            self._busy.add(key)

    def release(self, sha256: str, owner: str = "") -> None:
        """End a stream: flush and fsync what was written so ``begin`` can resume from it."""
        key = (owner, sha256)
        with self._lock:
            up = self._uploads.get(key)
            if up is not None and up.fh is not None:
                up.fh.flush()
                os.fsync(up.fh.fileno())
                up.fh.close()
                up.fh = None
            self._busy.discard(key)  # only now may another stream continue the object

    def write(self, sha256: str, offset: int, data: bytes, owner: str = "") -> int:
        """Append ``data`` at ``offset`` (must be the current length); returns the new length."""
        up = self._uploads[(owner, sha256)]
        if offset != up.offset:
            raise BulkError(
                f"bulk object {sha256[:12]}…: chunk at offset {offset}, expected {up.offset}; "
                "call Begin again and resume from the offset it returns"
            )
        if up.offset + len(data) > up.total_size:
            raise BulkError(
                f"bulk object {sha256[:12]}…: {up.offset + len(data)} bytes exceed the declared "
                f"{up.total_size}"
            )
        if up.fh is None:
            part = self.part_path(sha256, owner)
            with self._lock:
                part.parent.mkdir(exist_ok=True)
                up.fh = part.open("ab")
        up.fh.write(data)
        up.hasher.update(data)
        up.offset += len(data)
        return up.offset

    def finish(self, sha256: str, owner: str = "") -> BulkStatus:
        """If every byte arrived: verify the hash and publish the object atomically."""
        up = self._uploads[(owner, sha256)]
        if up.offset < up.total_size:
            return BulkStatus(sha256, up.total_size, up.offset, False)
        part = self.part_path(sha256, owner)
        if up.fh is not None:
            up.fh.flush()
            os.fsync(up.fh.fileno())
            up.fh.close()
            up.fh = None
        actual = up.hasher.hexdigest()
        with self._lock:
            self._uploads.pop((owner, sha256), None)
        if actual != sha256:
            self._discard(part)
            raise BulkError(
                f"bulk object declared as {sha256[:12]}… hashes to {actual[:12]}…; "
                "the upload was discarded — "
                "resend it (the file may have changed while it was read)"
            )
        if self.track_owners:  # before publishing: a published object always names its owner
            self._record_owner(sha256, owner)
        os.replace(part, self.objects / sha256)
        fsync_dir(self.objects)
        self._discard(part)  # (already moved) removes the owner's directory when empty
        return BulkStatus(sha256, up.total_size, up.total_size, True)

    def put_bytes(self, data: bytes) -> BulkStatus:
        """Store a whole payload at once (the unary reference path of the benchmark)."""
        sha = hashlib.sha256(data).hexdigest()
        if len(data) > self.max_bytes:
            raise BulkError(f"payload of {len(data)} bytes exceeds the limit {self.max_bytes}")
        if not self.has(sha):
            tmp = self.partial / f"{sha}.unary"
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.objects / sha)
            fsync_dir(self.objects)
        return BulkStatus(sha, len(data), len(data), True)
