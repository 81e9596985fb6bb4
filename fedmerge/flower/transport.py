"""Carry a DeltaPackage inside a Flower ``RecordDict``, and accept plain dense replies too.

A package travels as one :class:`flwr.app.Array` with ``stype = "fedmerge-delta-v1"`` (dtype
``uint8``, shape ``(len,)``, data = the serialized package) inside the ArrayRecord
``"fedmerge.delta"``, so Flower's chunked transport carries it unchanged and ``.numpy()`` refuses
it. Ordinary Flower clients that reply with full weights as an ArrayRecord are accepted by
:func:`dense_record_to_task_vector`, which turns them into τ = θ_client − θ_base.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from numpy.lib import format as npformat

from fedmerge.codec.errors import (
    MalformedPackage,
    PackageError,
    PayloadSizeMismatch,
    TensorNameMismatch,
    TensorShapeMismatch,
)
from fedmerge.delta.state_dict import TaskVector, floating_names, task_vector

STYPE = "fedmerge-delta-v1"
RECORD_KEY = "fedmerge.delta"
FISHER_RECORD_KEY = "fedmerge.fisher"  # a client's diagonal Fisher, a package like its delta's
ARRAY_KEY = "package"


class MissingPackage(MalformedPackage):
    """A reply carries no fedmerge package (or an Array of another stype where one was expected)."""


def package_to_record(data: bytes, key: str = RECORD_KEY) -> RecordDict:
    """A RecordDict holding ``data`` (a serialized DeltaPackage) as one Array of stype ``STYPE`` in the
    ArrayRecord ``key`` (the delta's by default)."""
    array = Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))
    return RecordDict({key: ArrayRecord({ARRAY_KEY: array})})


def record_to_package(rd: RecordDict, key: str = RECORD_KEY) -> bytes:
    """The serialized package in a RecordDict made by :func:`package_to_record` (else MissingPackage)."""
    record = rd.array_records.get(key)
    if record is None:
        raise MissingPackage(
            f"reply has no ArrayRecord {key!r} (has {sorted(rd.array_records)}); "
            "send it with fedmerge.flower.transport.package_to_record"
        )
    array = record.get(ARRAY_KEY)
    if array is None or array.stype != STYPE:
        found = "nothing" if array is None else f"stype {array.stype!r}"
        raise MissingPackage(
            f"ArrayRecord {key!r} holds {found} under {ARRAY_KEY!r}, expected stype {STYPE!r}"
        )
    return bytes(array.data)


def dense_record_to_task_vector(
    rd: RecordDict, base: Mapping[str, torch.Tensor], *, key: str | None = None
) -> TaskVector:
    """τ = θ_reply − θ_base from a plain Flower reply holding full weights in one ArrayRecord.

    ``key`` selects the ArrayRecord (default: the only one). Names must be those of ``base``; every
    floating base tensor must be present (integer buffers may be present or absent). Each Array is
    judged on its ``.npy`` header *before* its data is read: version 1.0/2.0, a floating dtype without
    objects, C order, exactly the base's shape, and a payload of exactly ``numel × itemsize`` bytes
    after the header — so a header declaring shape ``(10**11,)`` is refused without allocating.
    Otherwise a PackageError subclass naming the tensor is raised.
    """
    records = rd.array_records
    if key is None:
        if len(records) != 1:
            raise MalformedPackage(
                f"reply has {len(records)} ArrayRecords {sorted(records)}; pass key= to choose one"
            )
        key = next(iter(records))
    if key not in records:
        raise MalformedPackage(f"reply has no ArrayRecord {key!r} (has {sorted(records)})")
    record = records[key]
    extra = sorted(set(record) - set(base))
    if extra:
        raise TensorNameMismatch("is not a tensor of the base version", extra[0])
    floating = floating_names(base)
    for name in floating:
        if name not in record:
            raise TensorNameMismatch("is missing from the dense reply; send every parameter", name)
    out: TaskVector = {}
    for name in floating:
        weights = npy_to_tensor(record[name], name, tuple(base[name].shape))
        if not bool(torch.isfinite(weights).all()):
            raise PackageError("holds NaN or infinite values", name)
        out.update(task_vector({name: base[name]}, {name: weights}))
    return out


MAX_NPY_HEADER = 1 << 16


def npy_to_tensor(array: Array, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The floating tensor of shape ``shape`` in a Flower ``numpy.ndarray`` Array, judged on its
    ``.npy`` header before any element is read (see :func:`dense_record_to_task_vector`)."""
    if array.stype != "numpy.ndarray":
        raise MalformedPackage(
            f"Array has stype {str(array.stype)[:40]!r}, expected 'numpy.ndarray' (fedmerge packages "
            "travel under 'fedmerge.delta')",
            name,
        )
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedPackage(f"Array data is {type(data).__name__}, not bytes", name)
    stream = io.BytesIO(data)
    try:
        version = npformat.read_magic(stream)
        if version == (1, 0):
            declared, fortran, dtype = npformat.read_array_header_1_0(stream, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            declared, fortran, dtype = npformat.read_array_header_2_0(stream, max_header_size=MAX_NPY_HEADER)
        else:
            raise MalformedPackage(f".npy format version {version} is not 1.0 or 2.0", name)
    except (ValueError, TypeError, SyntaxError, EOFError, OverflowError) as exc:
        raise MalformedPackage(f"Array is not a readable .npy array ({exc})", name) from None
    if dtype.hasobject or dtype.kind != "f":
        raise PackageError(f"is {dtype} in the reply but floating in the base", name)
    if tuple(declared) != shape:
        raise TensorShapeMismatch(f"has shape {tuple(declared)} in the reply but {shape} in the base", name)
    if fortran and len(shape) > 1:
        raise MalformedPackage("is stored in Fortran order; send C-contiguous arrays", name)
    offset = stream.tell()
    numel = math.prod(shape)
    if len(data) - offset != numel * dtype.itemsize:
        raise PayloadSizeMismatch(
            f"holds {len(data) - offset} data bytes but shape {shape} of {dtype} needs "
            f"{numel * dtype.itemsize}",
            name,
        )
    values = np.frombuffer(data, dtype=dtype, count=numel, offset=offset).reshape(shape)
    return torch.from_numpy(values.astype(values.dtype.newbyteorder("="), copy=True))
