"""A node's tensors in ``context.state``, and the process's cache of rebuilt base versions.

**Packed tensors.** Flower's ``ArrayRecord`` keeps every tensor as a ``.npy`` blob, whose header
numpy parses (``ast.literal_eval``) on every read; a node that keeps its base and its error-feedback
residual in ``context.state`` would pay that for every tensor twice per update. Here a state dict is
one :class:`flwr.app.Array` of stype :data:`STYPE` (``uint8``) whose bytes are::

    u64 little-endian n | n bytes of JSON [[name, dtype, shape, offset, nbytes], …] | tensor bytes

each tensor's bytes C-contiguous at its ``offset`` (from the end of the header, a multiple of 16),
any torch dtype (bf16 included: no numpy involved). :func:`unpack_tensors` makes one writable copy of
the payload and returns views into it; a malformed blob raises :class:`NodeStateError`.

**Base cache.** Every node of a simulation that runs in the same process rebuilds the same version
from the same parent and the same compressed update. :class:`BaseCache` keeps, per process, the last
few base versions keyed by their :func:`~fedmerge.flower.downlink.weights_digest` (with their packed
form), and which (parent digest, sha256 of the update package) produced which digest, so a node whose
held parent has that digest obtains the verified result without decoding and adding again: the result
is a function of the parent's bytes and the package's bytes alone, and it was checked against the
server's digest when it was first computed.

**Node-local directory.** Flower's simulation engine moves a node's ``context.state`` with every
message (pickled through Ray), and a SuperNode hands it to its ClientApp process with every message;
so the base and the residual (each as large as the model) are kept out of it. :class:`NodeFiles`
keeps them as files under the node's ``node-state-dir`` (node config; default
:func:`default_state_dir`), which outlive a process: bases by digest (checked again on read),
residuals per (run, node) named by the sha256 that ``context.state`` holds. ``context.state`` holds
only identifiers (version id, hash, digest; the residual's sha256). A node whose files are gone (it
runs on another host, the directory was cleared) fails with ``MissingBase`` and is sent the full
weights; its error feedback restarts at zero and its reply says so (``ef-residual-lost``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord

from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import FedMergeError

STYPE = "fedmerge-tensors-v1"
ARRAY_KEY = "tensors"
_ALIGN = 16
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}  # fmt: skip


class NodeStateError(FedMergeError, ValueError):
    """The packed tensors kept in ``context.state`` are not readable (not written by this module)."""


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The packed bytes of ``tensors`` (names in the given order; each tensor's values copied once)."""
    layout: list[tuple[str, str, list[int], int, int]] = []
    offset = 0
    flat: list[torch.Tensor] = []
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise NodeStateError(f"tensor {name!r} has dtype {dtype}, which the node state cannot keep")
        t = tensor.detach().cpu().contiguous().reshape(-1)
        nbytes = t.numel() * t.element_size()
        layout.append((name, dtype, list(tensor.shape), offset, nbytes))
        flat.append(t)
        offset += -(-nbytes // _ALIGN) * _ALIGN
    header = json.dumps(layout, separators=(",", ":")).encode()
    out = bytearray(8 + len(header) + offset)
    out[:8] = struct.pack("<Q", len(header))
    out[8 : 8 + len(header)] = header
    if offset:
        payload = torch.frombuffer(out, dtype=torch.uint8, offset=8 + len(header), count=offset)
        for (_, _, _, start, nbytes), t in zip(layout, flat, strict=True):
            if nbytes:
                payload[start : start + nbytes] = t.view(torch.uint8)
    return bytes(out)


def unpack_tensors(data: bytes) -> StateDict:
    """The tensors of :func:`pack_tensors`' bytes: views into one writable copy of the payload."""
    try:
        (size,) = struct.unpack_from("<Q", data, 0)
        layout = json.loads(bytes(data[8 : 8 + size]))
        start = 8 + size
        payload = bytearray(memoryview(data)[start:])  # the one copy (slicing bytes would add one)
        buffer = (
            torch.frombuffer(payload, dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        )
        out: StateDict = {}
        for name, dtype, shape, offset, nbytes in layout:
            dt = _DTYPES[dtype]
            if nbytes != math.prod(shape) * torch.empty(0, dtype=dt).element_size():
                raise ValueError(f"{nbytes} bytes for shape {shape} of {dtype}")
            if offset < 0 or offset + nbytes > len(payload):
                raise ValueError(f"tensor {name!r} lies outside the payload")
            out[str(name)] = buffer[offset : offset + nbytes].view(dt).reshape(shape)
        return out
    except (struct.error, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise NodeStateError(f"node state is not a packed tensor blob of this version ({exc})") from None


def packed_record(data: bytes) -> ArrayRecord:
    """An ArrayRecord holding packed bytes as one Array of stype :data:`STYPE`."""
    return ArrayRecord({ARRAY_KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def record_bytes(record: ArrayRecord) -> bytes:
    """The packed bytes of an ArrayRecord made by :func:`packed_record` (else :class:`NodeStateError`)."""
    array = record.get(ARRAY_KEY)
    if array is None or array.stype != STYPE or len(record) != 1:
        raise NodeStateError(
            f"node state record holds {sorted(record)}, not one Array of stype {STYPE!r}; "
            "it was written by another fedmerge version"
        )
    return bytes(array.data)


class BaseCache:
    """Per-process LRU of base versions (digest → tensors and packed bytes) and of verified downlink
    applications ((parent digest, package sha256) → result digest). Thread-safe. At most ``capacity``
    versions and ``max_bytes`` of packed weights: a version larger than that is not cached (its node
    reads it back from ``context.state``), so a large model is never held twice per process."""

    def __init__(self, capacity: int = 3, max_bytes: int = 256 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bases: OrderedDict[str, tuple[StateDict, bytes]] = OrderedDict()
        self._applied: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> tuple[StateDict, bytes] | None:
        with self._lock:
            entry = self._bases.get(digest)
            if entry is not None:
                self._bases.move_to_end(digest)
            return entry

    def put(self, digest: str, tensors: StateDict, packed: bytes) -> bool:
        """Cache a version; False (nothing kept) when it alone exceeds ``max_bytes``."""
        if len(packed) > self.max_bytes:
            return False
        with self._lock:
            self._bases[digest] = (tensors, packed)
            self._bases.move_to_end(digest)
            while len(self._bases) > self.capacity or self._cached_bytes() > self.max_bytes:
                self._bases.popitem(last=False)
            return digest in self._bases

    def _cached_bytes(self) -> int:
        return sum(len(packed) for _, packed in self._bases.values())

    def applied(self, parent_digest: str, package_sha: str) -> str | None:
        """The digest that ``package_sha`` applied to ``parent_digest`` gave, when it is still cached."""
        with self._lock:
            result = self._applied.get((parent_digest, package_sha))
            return result if result is not None and result in self._bases else None

    def record_applied(self, parent_digest: str, package_sha: str, result_digest: str) -> None:
        with self._lock:
            self._applied[(parent_digest, package_sha)] = result_digest
            self._applied.move_to_end((parent_digest, package_sha))
            while len(self._applied) > 4 * self.capacity:
                self._applied.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._bases.clear()
            self._applied.clear()


BASES = BaseCache()


# ------------------------------------------------------------------------- the node-local directory

STATE_DIR_KEY = "node-state-dir"  # node config: where a node keeps its base and residual files
STATE_DIR_ENV = "FEDMERGE_NODE_STATE_DIR"
_SUFFIX = ".fmt"


def default_state_dir() -> Path:
    """``$FEDMERGE_NODE_STATE_DIR``, else ``fedmerge-node-state-<uid>`` in ``/dev/shm`` (memory, as
    ``context.state`` was: no journal or writeback on a busy disk for a file rewritten every round)
    when it is a writable directory, else in the temporary directory. A directory too small for a
    file (a container's 64 MiB ``/dev/shm``) refuses the write and the caller keeps the bytes in
    ``context.state``."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else _default_parent() / f"fedmerge-node-state-{_uid()}"


@functools.cache
def _default_parent() -> Path:
    """``/dev/shm`` when it is a writable directory, else the temporary directory (probed once per
    process: every ClientApp call asks)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


class NodeFiles:
    """A node-local directory of packed tensors that outlives a process: base versions by weights
    digest (``bases/<digest>.fmt``, shared by every node of the host: the name is the content's
    digest, checked again on every read) and each node's error-feedback residual
    (``residuals/<run id>/<node id>-<sha256>.fmt``: the sha256 of the bytes, kept in ``context.state``,
    names the one file that node may read; the process also remembers the residuals it wrote, so a
    node that runs in it again reads no file). Base files are written to a temporary name and
    renamed, so a reader sees a whole file or none; residual files are checked by their sha256. They
    are a cache (no fsync): a file that is missing or does not match is reported as absent, and the
    caller falls back (full weights from the server; error feedback restarted at zero).

    At most ``max_bases`` base files and ``max_bytes`` of them are kept (least recently used first
    out); a base larger than ``max_bytes``, or a residual larger than ``max_residual_bytes``, is not
    written (the caller keeps it in ``context.state``, which ends with the run: a large model's
    residuals are not left in the host's memory after it).
    Residual directories of runs untouched for ``stale_s`` seconds are removed when the first
    residual of a process is written (six hours by default: a run whose nodes on this host wrote nothing for
    longer restarts their error feedback at zero; a host that runs many simulations does not fill its
    memory)."""

    def __init__(
        self,
        root: Path,
        max_bases: int = 8,
        max_bytes: int = 512 << 20,
        max_residual_bytes: int = 16 << 20,
        stale_s: float = 6 * 3600.0,
    ) -> None:
        self.root = root
        self.max_bases = max_bases
        self.max_bytes = max_bytes
        self.max_residual_bytes = max_residual_bytes
        self.stale_s = stale_s
        self._written: set[str] = set()  # base digests this process wrote or found on disk
        # (run id, node id) → (sha256, packed bytes) of the residuals this process wrote: a node that
        # runs in the same process again skips reading and hashing its file
        self._residuals: OrderedDict[tuple[int, int], tuple[str, bytes]] = OrderedDict()
        self._folders: set[Path] = set()
        self._swept = False
        self._lock = threading.Lock()

    # bases
    def _base_path(self, digest: str) -> Path:
        if not _is_hex(digest):
            raise NodeStateError(f"base digest {digest!r} is not a hex sha256")
        return self.root / "bases" / f"{digest}{_SUFFIX}"

    def write_base(self, digest: str, packed: bytes) -> bool:
        """Keep a base version's packed bytes; False when it is over ``max_bytes`` or the directory is
        not writable (the caller keeps the bytes in ``context.state`` instead)."""
        if len(packed) > self.max_bytes:
            return False
        path = self._base_path(digest)
        with self._lock:
            if digest in self._written and path.exists():
                return True
        try:
            if not path.exists():
                _write_atomic(path, packed)
                self._prune_bases()
        except OSError:
            return False
        with self._lock:
            self._written.add(digest)
        return True

    def read_base(self, digest: str) -> bytes | None:
        """The packed bytes of base ``digest`` when the directory holds them (unverified: the caller
        checks the digest of what it unpacks), else None."""
        try:
            path = self._base_path(digest)
            data = path.read_bytes()
            os.utime(path)  # recently used: pruned last
            return data
        except (OSError, NodeStateError):
            return None

    def _prune_bases(self) -> None:
        entries = []
        for p in (self.root / "bases").glob(f"*{_SUFFIX}"):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort(reverse=True)  # newest first
        total = 0
        for i, (_, size, p) in enumerate(entries):
            total += size
            if i >= self.max_bases or total > self.max_bytes:
                p.unlink(missing_ok=True)
                with self._lock:
                    self._written.discard(p.name.removesuffix(_SUFFIX))

    # residuals
    def _residual_dir(self, run_id: int) -> Path:
        return self.root / "residuals" / str(int(run_id))

    def write_residual(
        self, run_id: int, node_id: int, packed: bytes, keep: str | None = None, drop: str | None = None
    ) -> str:
        """Keep a node's residual; its sha256 (for ``context.state``). ``keep``: the residual the
        node's ``context.state`` names until this reply is delivered (a reply that fails leaves that
        state in place), ``drop``: the one before it, whose file is removed. The file is written
        under its final name (a torn write fails the sha256 check on read: error feedback restarts at
        zero). OSError when not writable (nothing is left behind)."""
        sha = hashlib.sha256(packed).hexdigest()
        folder = self._residual_dir(run_id)
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        path = folder / f"{int(node_id)}-{sha}{_SUFFIX}"
        try:
            with open(path, "wb") as f:
                f.write(packed)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        if drop and drop not in (sha, keep) and _is_hex(drop):
            (folder / f"{int(node_id)}-{drop}{_SUFFIX}").unlink(missing_ok=True)
        with self._lock:
            self._residuals[(int(run_id), int(node_id))] = (sha, packed)
            self._residuals.move_to_end((int(run_id), int(node_id)))
            total = sum(len(v[1]) for v in self._residuals.values())
            while total > self.max_bytes and self._residuals:
                total -= len(self._residuals.popitem(last=False)[1][1])
        if not self._swept:
            self._swept = True
            self._sweep_stale_runs(keep=folder)
        return sha

    def read_residual(self, run_id: int, node_id: int, sha: str) -> bytes | None:
        """The node's residual whose bytes have sha256 ``sha``, else None (missing or other bytes)."""
        if not _is_hex(sha):
            return None
        with self._lock:
            held = self._residuals.get((int(run_id), int(node_id)))
        if held is not None and held[0] == sha:
            return held[1]
        try:
            data = (self._residual_dir(run_id) / f"{int(node_id)}-{sha}{_SUFFIX}").read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha else None

    def forget(self) -> None:
        """Drop what this process remembers (as a process that starts afresh): files are read again."""
        with self._lock:
            self._residuals.clear()
            self._written.clear()
            self._folders.clear()

    def _sweep_stale_runs(self, keep: Path) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            for folder in (self.root / "residuals").iterdir():
                with contextlib.suppress(OSError):
                    if folder != keep and now - folder.stat().st_mtime > self.stale_s:
                        shutil.rmtree(folder, ignore_errors=True)


def _is_hex(value: str) -> bool:
    return bool(value) and all(c in "0123456789abcdef" for c in value)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_FILES: dict[Path, NodeFiles] = {}
_FILES_LOCK = threading.Lock()


def node_files(node_config: Mapping[str, Any]) -> NodeFiles:
    """The process's :class:`NodeFiles` for the node's ``node-state-dir`` (node config), else
    :func:`default_state_dir`."""
    value = node_config.get(STATE_DIR_KEY)
    root = Path(str(value)) if value else default_state_dir()
    with _FILES_LOCK:
        files = _FILES.get(root)
        if files is None:
            files = _FILES[root] = NodeFiles(root)
        return files
