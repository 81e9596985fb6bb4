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
server's digest when it was first computed. ``context.state`` stays the durable copy: a node that
lands in another process (or after a restart) reads its base back from its packed bytes.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping

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
