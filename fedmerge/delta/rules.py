"""The rules every contribution meets before it is merged, at the floor of the library (no import
above :mod:`fedmerge.delta`): the refusal classes, the base check, the magnitude bound and the one
finiteness check.

Magnitude bound (:func:`value_bound`): every value must satisfy |x| ≤ B, where B is what the
arithmetic can hold in fp32 without overflow::

    B = min( FP32_MAX / (4·W),  sqrt(FP32_MAX / (4·P)) )

with P the number of base entries and W the largest total weight an accumulator multiplies a value
by (see :mod:`fedmerge.submission`). :func:`check_values` refuses a value above B (or NaN/inf) in a
contribution; :func:`check_finite` refuses a merge result that is NaN or infinite with the one
:class:`NonFiniteMerge` used by rounds, the intake worker and the continual mergers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import InvalidSubmission

FP32_MAX = float(torch.finfo(torch.float32).max)


class StaleOrInvalid(InvalidSubmission):
    """A well-formed submission the server cannot use: stale base or round, duplicate, bad weight or size."""


class IncompleteSubmission(InvalidSubmission):
    """A submission does not cover what its kind requires (no tensor, one LoRA factor of a pair...)."""


class ValueOutOfBounds(InvalidSubmission):
    """A value exceeds the magnitude bound the merge arithmetic can hold (:func:`value_bound`)."""


class NonFiniteMerge(InvalidSubmission, ArithmeticError):
    """Merging a contribution would make the merged model (or a merger's state) NaN or infinite; what
    made it so is left out. ``name`` is the first non-finite tensor when one is known."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


# ------------------------------------------------------------------------------------------ bounds


def value_bound(shapes: Mapping[str, tuple[int, ...]], *, total_weight: float = 1.0) -> float:
    """B = min(FP32_MAX / (4·W), sqrt(FP32_MAX / (4·P))), P = Σ numel(shapes), W = ``total_weight``
    (module docstring): the largest |value| whose weighted sums and squared norms stay finite in fp32."""
    p = max(1, sum(math.prod(s) for s in shapes.values()))
    w = max(1.0, float(total_weight))
    return min(FP32_MAX / (4.0 * w), math.sqrt(FP32_MAX / (4.0 * p)))


def check_values(tensors: Mapping[str, torch.Tensor | SparseTensor], bound: float, what: str) -> None:
    """Every value finite and |value| ≤ ``bound``; else NonFinite/ValueOutOfBounds naming the tensor."""
    for name in sorted(tensors):
        t = tensors[name]
        values = t.values if isinstance(t, SparseTensor) else t
        if values.numel() == 0:
            continue
        low, high = torch.aminmax(values.detach())  # one pass; NaN propagates into both, ±inf shows
        peak = max(-float(low), float(high))
        if not math.isfinite(float(low)) or not math.isfinite(float(high)):
            raise ValueOutOfBounds(f"{what}: tensor {name!r} holds NaN or infinite values")
        if peak > bound:
            raise ValueOutOfBounds(
                f"{what}: tensor {name!r} holds |value| = {peak:.4g} above the bound {bound:.4g} the "
                "merge can hold in fp32 without overflow; task vectors are θ_ft − θ₀, check the run"
            )


# ------------------------------------------------------------------------------------------ base


def check_package_base(meta_id: str, meta_hash: str, base_id: str, base_hash: str) -> None:
    """Refuse (:class:`StaleOrInvalid`) a package not computed against this base: its
    ``base_version_id`` must equal ``base_id`` and its ``base_version_hash`` equal ``base_hash``, both
    set (one policy for intake and rounds; a package naming no base is refused like a stale one)."""
    if meta_id == base_id and meta_hash == base_hash and meta_id and meta_hash:
        return
    got_hash = meta_hash[:16] + "…" if meta_hash else "(none)"
    if not meta_id or not meta_hash:
        raise StaleOrInvalid(
            f"delta package names no base (id {meta_id or '(none)'!r}, hash {got_hash}); set "
            f"base_version_id={base_id!r} and base_version_hash={base_hash!r} in PackageMeta"
        )
    raise StaleOrInvalid(
        f"stale delta package: computed against base {meta_id!r} (hash {got_hash}) but this server "
        f"merges onto base {base_id!r} (hash {base_hash[:16]}…; expected hash {base_hash}, received "
        f"{meta_hash}); recompute the delta against that version"
    )


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first name (sorted) of a floating tensor in ``tensors`` holding NaN or ±inf, or None."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteMerge` naming the first tensor of ``tensors`` holding NaN or ±inf:
    ``"{what}: tensor 'name' is NaN or infinite"``."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteMerge(f"{what}: tensor {bad!r} is NaN or infinite", bad)
