"""Names of the records that fedmerge's ServerApp and ClientApps exchange inside a Flower ``RecordDict``.

Shared by both sides, so a client process imports these names without the server's round engine
(aggregators, numba, the store).

A ``train`` message follows Flower's own strategies (``flwr.serverapp.strategy.FedAvg``):

* ``"arrays"`` (:data:`ARRAYS_RECORD`): the base model's full weights, an ``ArrayRecord`` (left out
  only for nodes known to be fedmerge clients that already hold the base or get a compressed update);
* ``"config"`` (:data:`CONFIG_RECORD`): the training settings, a ``ConfigRecord`` (``server-round``,
  ``lr``, ``local-epochs``, ``batch-size``, plus fedmerge's ``task``, ``mode``, ``seed`` …).

fedmerge's extras travel beside them: ``"fedmerge.config"`` (:data:`FEDMERGE_RECORD`: base version
id and content hash, codec, DP and fault settings) and, for the compressed downlink,
``"fedmerge.update"`` / ``"fedmerge.update-meta"``. A plain Flower client ignores them and replies
``"arrays"`` + ``"metrics"`` (with ``"num-examples"``); a fedmerge client replies a codec package in
``"fedmerge.delta"`` (:mod:`fedmerge.flower.transport`) + ``"metrics"``.

**Dtypes in ``"arrays"``** (numpy, hence Flower's ``Array``, has no bfloat16): every tensor whose
dtype numpy lacks (``torch.bfloat16``) travels *widened* to float32 — lossless, every bf16 value is
an fp32 value — and float16/float32/float64 travel as they are. The same message then carries the
ConfigRecord ``"fedmerge.dtypes"`` (:data:`DTYPES_RECORD`) mapping each widened tensor's name to its
original dtype name (``"bfloat16"``); the record is absent when nothing was widened.
:func:`widen_for_numpy` makes both, :func:`narrow_from_numpy` undoes them. A plain client may ignore
the record and reply float32: the server computes its delta against the widened base in fp32 and
the merged version keeps the base's dtype. fedmerge's own packages (compressed and bulk) carry bf16
natively and never need this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
FEDMERGE_RECORD = "fedmerge.config"
UPDATE_RECORD = "fedmerge.update"  # compressed downlink: parent → base update (fedmerge.flower.downlink)
UPDATE_META_RECORD = "fedmerge.update-meta"
BASE_RECORD = ARRAYS_RECORD  # the base weights travel as Flower's "arrays"
DTYPES_RECORD = "fedmerge.dtypes"  # tensor name → original dtype name of each tensor widened in "arrays"
# dtypes numpy lacks → what they travel as in "arrays" (lossless widening)
WIDENED_DTYPES: dict[str, str] = {"bfloat16": "float32"}


class DtypeRecordError(ValueError):
    """A ``"fedmerge.dtypes"`` record that does not fit the weights it describes."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the names :data:`DTYPES_RECORD` uses)."""
    return str(dtype).removeprefix("torch.")


def widen_for_numpy(
    weights: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors for Flower's ``"arrays"``, the ``"fedmerge.dtypes"`` mapping): each tensor whose dtype
    numpy lacks (:data:`WIDENED_DTYPES`) cast losslessly to float32, every other tensor unchanged;
    the mapping names exactly the widened tensors with their original dtype (empty: nothing widened)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    widened: dict[str, str] = {}
    for name, tensor in weights.items():
        original = dtype_name(tensor.dtype)
        wide = WIDENED_DTYPES.get(original)
        if wide is None:
            out[name] = tensor
        else:
            out[name] = tensor.to(getattr(torch, wide))
            widened[name] = original
    return out, widened


def dtypes_of(record: Mapping[str, Any] | None, names: Any) -> dict[str, str]:
    """The ``"fedmerge.dtypes"`` record checked against the tensor ``names`` it describes: every key a
    tensor name, every value a dtype in :data:`WIDENED_DTYPES`; ``{}`` when the record is absent.
    Otherwise :class:`DtypeRecordError` naming the first bad entry."""
    if record is None:
        return {}
    known = set(names)
    out: dict[str, str] = {}
    for name, value in record.items():
        if name not in known:
            raise DtypeRecordError(f"{DTYPES_RECORD!r} names {name!r}, which is not a tensor of 'arrays'")
        if not isinstance(value, str) or value not in WIDENED_DTYPES:
            raise DtypeRecordError(
                f"{DTYPES_RECORD!r} gives tensor {name!r} dtype {str(value)[:40]!r}; only "
                f"{sorted(WIDENED_DTYPES)} are widened"
            )
        out[str(name)] = value
    return out


def narrow_from_numpy(
    tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Undo :func:`widen_for_numpy`: each tensor named in ``dtypes`` cast back to its original dtype
    (exact for values that were widened), the others unchanged."""
    import torch

    out = dict(tensors)
    for name, original in dtypes.items():
        if name not in out:
            raise DtypeRecordError(f"{DTYPES_RECORD!r} names {name!r}, which is not a tensor of 'arrays'")
        out[name] = out[name].to(getattr(torch, original))
    return out


__all__ = [
    "ARRAYS_RECORD",
    "BASE_RECORD",
    "CONFIG_RECORD",
    "DTYPES_RECORD",
    "FEDMERGE_RECORD",
    "METRICS_RECORD",
    "UPDATE_META_RECORD",
    "UPDATE_RECORD",
    "WIDENED_DTYPES",
    "DtypeRecordError",
    "dtype_name",
    "dtypes_of",
    "narrow_from_numpy",
    "widen_for_numpy",
]
