"""Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent"; multi-Krum from El Mhamdi et al. 2018).

With n clients of which at most f are Byzantine, and k = n − f − 2 neighbours:

    s(i) = Σ_{j ∈ NN_k(i)} ‖τ_i − τ_j‖²       (the k closest other clients, whole-model L2 distance)
    Krum:        τ = τ_{i*},  i* = argmin_i s(i)
    multi-Krum:  τ = (1/m) Σ_{i ∈ M} τ_i,  M = the m clients of lowest score  (m = n − f by default)

The guarantee needs n ≥ 2f + 3. ``num_byzantine=None`` takes the largest f it allows,
f = max(0, ⌊(n − 3)/2⌋); with n ≤ 2 there is no robustness (k = n − 1). Ties in score are broken
by client id (its string), so the result does not depend on arrival order. Unweighted: a weight would
let one client buy selection. Buffers every delta: memory O(N·P). ``selected`` and ``scores`` hold the
outcome of the last merge (client id → score) for the manifest.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import register
from fedmerge.aggregators.robust import BufferingAggregator
from fedmerge.errors import AggregatorStateError, ConfigError


def pairwise_sq_distances(stacks: list[torch.Tensor]) -> torch.Tensor:
    """(n, n) fp64 matrix of ‖τ_i − τ_j‖² summed over tensors; each stack is (n, numel)."""
    n = stacks[0].shape[0]
    d = torch.zeros(n, n, dtype=torch.float64)
    for s in stacks:
        x = s.to(torch.float64)
        d += torch.cdist(x, x).pow(2)
    return d


def krum_scores(sq_dist: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """s(i) = sum of the ``num_neighbours`` smallest distances from i to the others (fp64, shape (n,))."""
    n = sq_dist.shape[0]
    if num_neighbours <= 0 or n == 1:
        return torch.zeros(n, dtype=torch.float64)
    others = sq_dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    return others.sort(dim=1).values[:, :num_neighbours].sum(dim=1)


class KrumBase(BufferingAggregator):
    tensorwise: ClassVar[bool] = False  # scores whole deltas (over every tensor at once)
    averaging: ClassVar[bool] = True

    def __init__(self, *, num_byzantine: int | None = None, **common: Any) -> None:
        super().__init__(**common)
        if num_byzantine is not None and (int(num_byzantine) != num_byzantine or num_byzantine < 0):
            raise ConfigError(f"num_byzantine must be an integer ≥ 0 or None, got {num_byzantine!r}")
        self.num_byzantine = None if num_byzantine is None else int(num_byzantine)
        self.selected: list[Any] = []
        self.scores: dict[Any, float] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "num_byzantine": self.num_byzantine}

    def begin(self, reference_shapes):
        super().begin(reference_shapes)
        self.selected, self.scores = [], {}

    def _f(self, n: int) -> int:
        if self.num_byzantine is None:
            return max(0, (n - 3) // 2)
        if n < 2 * self.num_byzantine + 3:
            raise AggregatorStateError(
                f"{self.name} with num_byzantine={self.num_byzantine} needs n ≥ 2f + 3 = "
                f"{2 * self.num_byzantine + 3} clients, got {n}; lower num_byzantine or wait for more clients"
            )
        return self.num_byzantine

    def _num_selected(self, n: int, f: int) -> int:
        return 1

    def finalize(self) -> dict[str, torch.Tensor]:
        self._require_begun()
        self._flush()
        if self._num_clients:
            n = self._num_clients
            f = self._f(n)
            keys = sorted(self._buffers)
            stacks = [torch.stack(self._buffers[k]) for k in keys]
            scores = krum_scores(pairwise_sq_distances(stacks), max(n - f - 2, min(1, n - 1)))
            order = sorted(range(n), key=lambda i: (float(scores[i]), str(self._ids[i])))
            chosen = sorted(order[: self._num_selected(n, f)], key=lambda i: str(self._ids[i]))
            self._chosen = chosen
            self.selected = [self._ids[i] for i in chosen]
            self.scores = {self._ids[i]: float(scores[i]) for i in range(n)}
        return super().finalize()

    def _reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked[self._chosen].mean(dim=0)


@register
class Krum(KrumBase):
    name: ClassVar[str] = "krum"


@register
class MultiKrum(KrumBase):
    name: ClassVar[str] = "multi_krum"

    def __init__(self, *, num_selected: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_selected is not None and (int(num_selected) != num_selected or num_selected < 1):
            raise ConfigError(f"num_selected must be an integer ≥ 1 or None (n − f), got {num_selected!r}")
        self.num_selected = None if num_selected is None else int(num_selected)

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "num_selected": self.num_selected}

    def _num_selected(self, n: int, f: int) -> int:
        return n - f if self.num_selected is None else min(self.num_selected, n)
