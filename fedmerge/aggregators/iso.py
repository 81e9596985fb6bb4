"""Isotropic merging (Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer, ICML 2025,
"No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces").

Iso-C (``iso_c``), per 2-D tensor (a matrix):

    M = Σ_i c_i τ_i,  M = U diag(σ) Vᵀ,  σ̄ = mean(σ)
    τ = α · U diag(σ̄, …, σ̄) Vᵀ           (the spectrum flattened: an isotropic merge)

Iso-CTS (``iso_cts``), per matrix of min(m, n) = r, T tasks, common fraction f (0.8):
    k = r − round((r − ⌊f·r⌋)/T)·T common directions from the top-k SVD of M; each task
    contributes its top d = (r − k)/T singular triplets of τ_i − U_k U_kᵀ τ_i; the concatenated left
    and right vectors are orthogonalised (polar factor P = AB ᵀ of A Σ Bᵀ) and every singular value
    is replaced by the mean of all kept ones: τ = α · σ̄ · P(U_cat) P(V_catᵀ).

Every other tensor (biases, norms, 1-D/3-D+) is the weighted mean Σ w_i τ_i / Σ w_i, then × α —
the official code's rule (``src/utils/iso.py``: "combining by avg"); it also treats CLIP's
``text_projection`` as a non-matrix, which this generic version does not. c_i = N·w_i / Σ w, so
unit weights give the paper's plain sum Σ τ_i and weights (numbers of examples) reweight it.

Defaults: α (``scaling``) = 1.0, FusionBench's ``scaling_factor``; the paper selects α on held-out
validation data (the official ``main.py`` searches a grid), so tune it where validation data exists.
``common_space_fraction`` = 0.8 (the official ``config/method/iso_cts.yaml``).

Rank: singular directions whose value is numerically zero (σ ≤ max(m, n)·eps₃₂·σ_max) are dropped
before flattening and before each orthogonalisation (:func:`polar`), so a rank-deficient M
(e.g. LoRA products) is not inflated along arbitrary null directions and the mean is over the kept
values. For full-rank matrices — the paper's setting — this is exactly the official computation.

Streaming: Iso-C needs only Σ w_i τ_i (one O(P) accumulator) and one SVD per matrix at finalize, so
it streams and works on secure sums. Iso-CTS needs each task's matrix after the common subspace of
the *sum* is known, so it buffers every delta: O(N·P), not streaming.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, Prepared, check_fraction, dense_of, register
from fedmerge.aggregators.linear import WeightedSumAggregator
from fedmerge.errors import AggregatorStateError


def numerical_rank_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a matrix with the numerically-zero singular triplets removed (fp32)."""
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    if s.numel() == 0:
        return u, s, vh
    tol = max(x.shape) * torch.finfo(torch.float32).eps * float(s[0])
    keep = s > tol
    return u[:, keep], s[keep], vh[keep, :]


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of a = U Σ Vᵀ (the closest matrix with orthonormal columns/rows),
    over a's numerically non-zero singular values: on a rank-deficient a (say a column of zeros in
    every task) the factor stays in a's row and column spaces instead of filling the null space with
    arbitrary directions. Identical to the plain polar factor when a has full rank."""
    if a.numel() == 0:
        return a
    u, _, vh = numerical_rank_svd(a)
    return u @ vh


def iso_flatten(m: torch.Tensor) -> torch.Tensor:
    """U diag(σ̄) Vᵀ over the numerically non-zero spectrum of m."""
    u, s, vh = numerical_rank_svd(m)
    if s.numel() == 0:
        return torch.zeros_like(m, dtype=torch.float32)
    return (u * s.mean()) @ vh


class _WeightCheck:
    name: ClassVar[str]
    _total_weight: float

    def _require_weight(self) -> float:
        if self._total_weight <= 0:
            raise AggregatorStateError(f"{self.name}: the client weights sum to 0; cannot normalise them")
        return self._total_weight


@register
class IsoC(_WeightCheck, WeightedSumAggregator):
    name: ClassVar[str] = "iso_c"
    spectral: ClassVar[bool] = True  # SVD-based: exact zeros hold only to rounding (~1e-6 relative)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        (acc,) = self._accumulators(key, 1)
        total = self._require_weight()
        if len(shape) != 2:
            return acc * (self.scaling / total)
        m = acc.reshape(shape) * (self._num_clients / total)  # Σ c_i τ_i, c_i = N w_i / Σ w
        return iso_flatten(m).reshape(-1) * self.scaling


class _TaskBuffer(_WeightCheck, Aggregator):
    """Buffers each client's dense fp32 tensor with its weight (for per-task SVDs)."""

    streaming: ClassVar[bool] = False

    def begin(self, reference_shapes: Mapping[str, Sequence[int]]) -> None:
        super().begin(reference_shapes)
        self._tasks: dict[str, list[tuple[torch.Tensor, float]]] = {}

    def _keep(self, key: str, x: torch.Tensor, weight: float) -> None:
        self._tasks.setdefault(key, []).append((x.reshape(-1).to(self.device, torch.float32), weight))

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        for it, w in zip(items, weights, strict=True):
            self._keep(key, dense_of(it.data), w)

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        self._keep(key, dense_of(item.data), weight)

    def _scaled_tasks(self, key: str, shape: tuple[int, ...]) -> list[torch.Tensor]:
        total = self._require_weight()
        n = self._num_clients
        return [x.reshape(shape) * (n * w / total) for x, w in self._tasks.pop(key)]

    def _mean(self, key: str) -> torch.Tensor:
        total = self._require_weight()
        tasks = self._tasks.pop(key)
        out = torch.zeros_like(tasks[0][0])
        for x, w in tasks:
            out.add_(x, alpha=w)
        return out / total


@register
class IsoCTS(_TaskBuffer):
    name: ClassVar[str] = "iso_cts"
    spectral: ClassVar[bool] = True

    def __init__(self, *, scaling: float = 1.0, common_space_fraction: float = 0.8, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.scaling = float(scaling)
        self.common_space_fraction = check_fraction("common_space_fraction", common_space_fraction)

    @property
    def params(self) -> dict[str, object]:
        return {
            **super().params,
            "scaling": self.scaling,
            "common_space_fraction": self.common_space_fraction,
        }

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) != 2:
            return self._mean(key) * self.scaling
        tasks = self._scaled_tasks(key, shape)
        return iso_cts_matrix(tasks, self.common_space_fraction).reshape(-1) * self.scaling


def iso_cts_split(r: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(common k, per-task d) exactly as the official code sizes them (Python's round)."""
    k = int(r * fraction)
    specific_total = round((r - k) / num_tasks) * num_tasks
    k = max(0, r - specific_total)
    d = int((r - k) / num_tasks)
    return k, d


def iso_cts_matrix(tasks: list[torch.Tensor], fraction: float) -> torch.Tensor:
    m = torch.stack(tasks).sum(0)
    r = min(m.shape)
    k, d = iso_cts_split(r, len(tasks), fraction)
    uc, sc, vc = numerical_rank_svd(m)
    uc, sc, vc = uc[:, :k], sc[:k], vc[:k, :]
    us, ss, vs = [], [], []
    for x in tasks:
        ut, st, vt = numerical_rank_svd(x - uc @ (uc.T @ x))
        us.append(ut[:, :d])
        ss.append(st[:d])
        vs.append(vt[:d, :])
    u = torch.cat([*us, uc], dim=1)
    s = torch.cat([*ss, sc])
    vh = torch.cat([*vs, vc], dim=0)
    if s.numel() == 0:
        return torch.zeros_like(m)
    return (polar(u) * s.mean()) @ polar(vh)
