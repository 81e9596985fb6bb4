"""TSV-Merge (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodolà, CVPR 2025, "Task
Singular Vectors: Reducing Task Interference in Model Merging"), ``tsv_m``.

Per 2-D tensor (a matrix) and T tasks:

    τ_i ≈ U_i,k diag(σ_i,k) V_i,kᵀ,  k = ⌊min(m, n) / T⌋        (TSV-C: each task's top-k triplets)
    U = [U_1,k … U_T,k],  Σ = diag(σ_1,k … σ_T,k),  V = [V_1,k … V_T,k]
    τ = α · P(U) Σ P(Vᵀ),   P(A) = the orthogonal polar factor A_u A_vᵀ of A = A_u S A_vᵀ
                                 (whitening: the nearest matrix with orthonormal columns)

Every other tensor is the weighted mean Σ w_i τ_i / Σ w_i (then × α), the official code's rule
(``compute_and_sum_svd_mem_reduction``: "computes the mean of the vectors"). Each task matrix is
scaled by c_i = N·w_i / Σ w (unit weights: the paper). α (``scaling``) = 1.0, the paper's setting
for TSV-M and FusionBench's ``alpha``. Singular triplets with numerically zero σ are not kept (the
official code keeps them, padded; identical for full-rank task matrices), and the polar factors are
taken over the non-zero spectrum of the concatenations (:func:`fedmerge.aggregators.iso.polar`): the
official code orthogonalises a zero-padded or rank-deficient concatenation, whose polar factor is
not unique and leaks into directions no task uses.

Not streaming: the orthogonalisation needs every task's factors together. With ``num_tasks`` set,
each task matrix is compressed on arrival to its k = ⌊min(m, n)/num_tasks⌋ factors, so the buffer is
O(N·k·(m + n)) ≈ O(P) per matrix (at most ``num_tasks`` models may then be added); without it the
full matrices are buffered, O(N·P), and compressed at finalize with T = the number added. Non-matrix
tensors are buffered either way (they are small). The per-task compression alone (TSV-C, a codec
for clients) and Fisher merging are not provided here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedmerge.aggregators.base import ClientDelta, Prepared, dense_of, register
from fedmerge.aggregators.iso import _TaskBuffer, numerical_rank_svd, polar
from fedmerge.errors import AggregatorStateError, ConfigError


def low_rank(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = numerical_rank_svd(x)
    return u[:, :k], s[:k], vh[:k, :]


def tsv_merge(
    factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shape: tuple[int, ...]
) -> torch.Tensor:
    u = torch.cat([f[0] for f in factors], dim=1)
    s = torch.cat([f[1] for f in factors])
    vh = torch.cat([f[2] for f in factors], dim=0)
    if s.numel() == 0:
        return torch.zeros(shape, dtype=torch.float32)
    return (polar(u) * s) @ polar(vh)


@register
class TsvM(_TaskBuffer):
    name: ClassVar[str] = "tsv_m"
    spectral: ClassVar[bool] = True  # SVD-based: exact zeros hold only to rounding

    def __init__(self, *, scaling: float = 1.0, num_tasks: int | None = None, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.scaling = float(scaling)
        if num_tasks is not None and int(num_tasks) < 1:
            raise ConfigError(f"num_tasks must be ≥ 1, got {num_tasks!r}")
        self.num_tasks = None if num_tasks is None else int(num_tasks)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "scaling": self.scaling, "num_tasks": self.num_tasks}

    def begin(self, reference_shapes: Mapping[str, Sequence[int]]) -> None:
        super().begin(reference_shapes)
        self._factors: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]] = {}

    def _admit(self, client_id: str | int, client_delta: ClientDelta) -> ClientDelta:
        if self.num_tasks is not None and self._num_clients >= self.num_tasks:
            raise AggregatorStateError(f"tsv_m was told num_tasks={self.num_tasks}; one more model was added")
        return super()._admit(client_id, client_delta)

    def _keep(self, key: str, x: torch.Tensor, weight: float) -> None:
        assert self._shapes is not None
        shape = self._shapes[key]
        if self.num_tasks is not None and len(shape) == 2:
            k = min(shape) // self.num_tasks
            u, s, vh = low_rank(x.reshape(shape).to(self.device, torch.float32), k)
            self._factors.setdefault(key, []).append((u, s, vh, weight))
            return
        super()._keep(key, x, weight)

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        for it, w in zip(items, weights, strict=True):
            self._keep(key, dense_of(it.data), w)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) != 2:
            return self._mean(key) * self.scaling
        total = self._require_weight()
        n = self._num_clients
        if self.num_tasks is not None:
            factors = [(u, s * (n * w / total), vh) for u, s, vh, w in self._factors.pop(key)]
        else:
            k = min(shape) // n
            factors = [low_rank(x, k) for x in self._scaled_tasks(key, shape)]
        return tsv_merge(factors, shape).reshape(-1) * self.scaling
