"""Per-client anomaly scores for a merge, recorded in the version manifest, with optional rejection.

For client i with delta τ_i and the merged delta τ:

    norm_i        = ‖τ_i‖₂
    norm_score_i  = |norm_i − med_j norm_j| / (1.4826 · MAD_j norm_j)   (robust z-score; MAD = median
                    absolute deviation, 1.4826 makes it σ for Gaussian data; a zero MAD is floored at
                    1e-12 · med so equal norms score 0)
    cosine_i      = ⟨τ_i, τ⟩ / (‖τ_i‖ ‖τ‖)                              (0 when either is zero)

A client is rejected when norm_score_i > ``max_norm_score`` or cosine_i < ``min_cosine`` (either
threshold None: that test is off). Sign-flip clients show cosine ≈ −1; scaling (model replacement)
clients show a large norm score. :func:`merge_with_rejection` merges, scores, drops the rejected and
merges again.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch

from fedmerge.aggregators.base import create
from fedmerge.delta.clipping import DeltaTensor, delta_norm
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError

Delta: TypeAlias = Mapping[str, DeltaTensor]
MAD_TO_SIGMA = 1.4826


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    # a product and a sum, not BLAS dot: BLAS threads spin on a busy machine and turn a dot of a
    # small tensor into milliseconds (see ``kernels.PARALLEL_MIN_ELEMENTS``)
    return float(torch.sum(x * y))


class CosineReference:
    """``b`` of :func:`cosine` prepared once for many calls (each reply of a round against the same
    aggregate): every tensor flat in fp64, in name order, and ‖b‖² summed in that order, so the result
    is bit for bit that of the unprepared call. Holds ``b`` in fp64: for in-memory references only."""

    def __init__(self, b: Mapping[str, torch.Tensor]) -> None:
        self.flat = dict(_flat64(b))
        self.sq_norm = 0.0
        for y in self.flat.values():
            self.sq_norm += _dot(y, y)


def _flat64(b: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor flat in fp64) in name order, one tensor at a time (a store view stays lazy)."""
    for name in sorted(b):
        yield name, b[name].detach().reshape(-1).to(torch.float64)


def cosine(a: Delta, b: Mapping[str, torch.Tensor] | CosineReference) -> float:
    """Cosine similarity of two deltas over all tensors (fp64); 0 if either is zero. A sparse ``a``
    is read at its non-zeros only; ``b`` may be prepared once (:class:`CosineReference`)."""
    dot = na = nb = 0.0
    prepared = isinstance(b, CosineReference)
    pairs = iter(b.flat.items()) if isinstance(b, CosineReference) else _flat64(b)
    for name, y in pairs:
        xa = a[name]
        if isinstance(xa, SparseTensor):
            x = xa.values.detach().reshape(-1).to(torch.float64)
            dot += _dot(x, y[xa.indices.to(torch.int64)])
        else:
            x = xa.detach().reshape(-1).to(torch.float64)
            dot += _dot(x, y)
        na += _dot(x, x)
        if not prepared:
            nb += _dot(y, y)
    if isinstance(b, CosineReference):
        nb = b.sq_norm
    if na == 0 or nb == 0:
        return 0.0
    return dot / math.sqrt(na * nb)


def robust_z(values: Sequence[float]) -> list[float]:
    """|v − median| / (1.4826 · MAD) for each value (see module doc)."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    scale = MAD_TO_SIGMA * mad if mad > 0 else max(1e-12 * abs(med), 1e-30)
    return [abs(v - med) / scale for v in values]


def anomaly_scores(
    deltas_or_norms: Mapping[Any, Delta | float],
    aggregate: Mapping[str, torch.Tensor] | None = None,
    *,
    max_norm_score: float | None = None,
    min_cosine: float | None = None,
) -> dict[Any, dict[str, Any]]:
    """client → {"norm", "norm_score", "cosine" (None without deltas/aggregate), "rejected", "reasons"}."""
    if not deltas_or_norms:
        raise ConfigError("anomaly_scores needs at least one client")
    if max_norm_score is not None and not max_norm_score > 0:
        raise ConfigError(f"max_norm_score must be > 0 or None, got {max_norm_score!r}")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise ConfigError(f"min_cosine must be in [-1, 1] or None, got {min_cosine!r}")
    clients = list(deltas_or_norms)
    norms = [_norm_of(deltas_or_norms[c], c) for c in clients]
    zs = robust_z(norms)
    out: dict[Any, dict[str, Any]] = {}
    for c, n, z in zip(clients, norms, zs, strict=True):
        item = deltas_or_norms[c]
        cos = None if aggregate is None or isinstance(item, int | float) else cosine(item, aggregate)
        reasons = []
        if max_norm_score is not None and z > max_norm_score:
            reasons.append(f"norm {n:.4g} is {z:.3g} robust σ from the median (limit {max_norm_score})")
        if min_cosine is not None and cos is not None and cos < min_cosine:
            reasons.append(f"cosine to the aggregate {cos:.3f} < {min_cosine}")
        out[c] = {"norm": n, "norm_score": z, "cosine": cos, "rejected": bool(reasons), "reasons": reasons}
    return out


def merge_with_rejection(
    name: str,
    deltas: Mapping[Any, Delta],
    weights: Mapping[Any, float] | None = None,
    *,
    max_norm_score: float | None = None,
    min_cosine: float | None = None,
    **params: Any,
) -> tuple[dict[str, torch.Tensor], dict[Any, dict[str, Any]]]:
    """Merge with aggregator ``name``, score every client against that merge, drop the rejected ones and
    merge the rest again. Returns (merged delta, scores of the first pass). Rejecting everyone is an error."""
    if not deltas:
        raise ConfigError("merge_with_rejection needs at least one delta")
    first = _merge(name, deltas, weights, params)
    scores = anomaly_scores(deltas, first, max_norm_score=max_norm_score, min_cosine=min_cosine)
    kept = {c: d for c, d in deltas.items() if not scores[c]["rejected"]}
    if not kept:
        raise ConfigError(
            f"every one of the {len(deltas)} clients was rejected (max_norm_score={max_norm_score}, "
            f"min_cosine={min_cosine}); loosen the thresholds"
        )
    if len(kept) == len(deltas):
        return first, scores
    return _merge(name, kept, weights, params), scores


def _merge(
    name: str, deltas: Mapping[Any, Delta], weights: Mapping[Any, float] | None, params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    agg = create(name, **params)
    first = next(iter(deltas.values()))
    agg.begin({k: tuple(v.shape) for k, v in first.items()})
    for cid, d in deltas.items():
        agg.add(d, 1.0 if weights is None else weights[cid], client_id=cid)
    return agg.finalize()


def _norm_of(item: Delta | float, client: Any) -> float:
    if isinstance(item, int | float):
        v = float(item)
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"client {client!r}: a norm must be finite and ≥ 0, got {item!r}")
        return v
    return delta_norm(item)
