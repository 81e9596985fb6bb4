"""Carry a DeltaPackage inside a Flower ``RecordDict``, and accept plain dense replies too.

A package travels as one :class:`flwr.app.Array` with ``stype = "fedmerge-delta-v1"`` (dtype
``uint8``, shape ``(len,)``, data = the serialized package) inside the ArrayRecord
``"fedmerge.delta"``, so Flower's chunked transport carries it unchanged and ``.numpy()`` refuses
it. Ordinary Flower clients that reply with full weights as an ArrayRecord are accepted by
:func:`dense_record_to_task_vector`, which turns them into τ = θ_client − θ_base.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedmerge.codec.errors import MalformedPackage, PackageError, TensorNameMismatch, TensorShapeMismatch
from fedmerge.delta.state_dict import StateDict, TaskVector, floating_names, task_vector

STYPE = "fedmerge-delta-v1"
RECORD_KEY = "fedmerge.delta"
ARRAY_KEY = "package"


class MissingPackage(MalformedPackage):
    """A reply carries no fedmerge package (or an Array of another stype where one was expected)."""


def package_to_record(data: bytes) -> RecordDict:
    """A RecordDict holding ``data`` (a serialized DeltaPackage) as one Array of stype ``STYPE``."""
    array = Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))
    return RecordDict({RECORD_KEY: ArrayRecord({ARRAY_KEY: array})})


def record_to_package(rd: RecordDict) -> bytes:
    """The serialized package in a RecordDict made by :func:`package_to_record` (else MissingPackage)."""
    record = rd.array_records.get(RECORD_KEY)
    if record is None:
        raise MissingPackage(
            f"reply has no ArrayRecord {RECORD_KEY!r} (has {sorted(rd.array_records)}); "
            "send it with fedmerge.flower.transport.package_to_record"
        )
    array = record.get(ARRAY_KEY)
    if array is None or array.stype != STYPE:
        found = "nothing" if array is None else f"stype {array.stype!r}"
        raise MissingPackage(
            f"ArrayRecord {RECORD_KEY!r} holds {found} under {ARRAY_KEY!r}, expected stype {STYPE!r}"
        )
    return bytes(array.data)


def dense_record_to_task_vector(rd: RecordDict, base: StateDict, *, key: str | None = None) -> TaskVector:
    """τ = θ_reply − θ_base from a plain Flower reply holding full weights in one ArrayRecord.

    ``key`` selects the ArrayRecord (default: the only one). Names and shapes must match the floating
    tensors of ``base`` (integer buffers may be present or absent); otherwise a PackageError subclass
    naming the tensor is raised.
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
    if any(a.stype != "numpy.ndarray" for a in record.values()):
        raise MalformedPackage(
            f"ArrayRecord {key!r} holds non-numpy arrays; use record_to_package for fedmerge packages"
        )
    try:
        weights = record.to_torch_state_dict()
    except (ValueError, TypeError) as exc:
        raise MalformedPackage(f"ArrayRecord {key!r} cannot be read as tensors: {exc}") from None
    _check_against_base(weights, base)
    floating = {name: base[name] for name in floating_names(base)}
    return task_vector(floating, {name: weights[name] for name in floating})


def _check_against_base(weights: Mapping[str, torch.Tensor], base: StateDict) -> None:
    for name in floating_names(base):
        if name not in weights:
            raise TensorNameMismatch("is missing from the dense reply; send every parameter", name)
        if tuple(weights[name].shape) != tuple(base[name].shape):
            raise TensorShapeMismatch(
                f"has shape {tuple(weights[name].shape)} in the reply "
                f"but {tuple(base[name].shape)} in the base",
                name,
            )
        if not weights[name].is_floating_point():
            raise PackageError(f"is {weights[name].dtype} in the reply but floating in the base", name)
        if not bool(torch.isfinite(weights[name]).all()):
            raise PackageError("holds NaN or infinite values", name)
    extra = sorted(set(weights) - set(base))
    if extra:
        raise TensorNameMismatch("is not a tensor of the base version", extra[0])
