"""MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning").

    τ_j = λ · τ_{i*, j},   i* = argmax_i |τ_{i, j}|        (per coordinate j)

Weights are ignored (the method has none). On an exact tie in magnitude the positive value wins,
so the result does not depend on client order. Streams in O(P) (one accumulator).

Max-magnitude selection is associative and commutative, so folding experts one at a time (the
continual merger of the same name, :mod:`fedmerge.aggregators.continual.batch`) gives exactly the
batch result in any order. Defaults, declared here once:

* batch, λ = 1 (``scaling``): the selected values unscaled, so that identical client deltas merge to
  that delta (``averaging``), which a federated round relies on;
* continual (``continual_defaults``), λ = 0.5: the MagMax paper's (``scaling_coef=0.5`` in its
  released 8-dataset script) and FusionBench's (``config/method/magmax/magmax.yaml``) default, as
  compared in Tang et al. 2025. The selected values come from several experts, each a full task
  vector, so the merged one is scaled down. The paper fine-tunes each expert from the previous
  one; a server receiving independent experts cannot.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import Prepared, register
from fedmerge.aggregators.kernels import max_abs_dense, max_abs_sparse
from fedmerge.aggregators.linear import ScaledAggregator
from fedmerge.delta.sparse import SparseTensor


@register
class MagMax(ScaledAggregator):
    name: ClassVar[str] = "magmax"
    averaging: ClassVar[bool] = True
    continual_defaults: ClassVar[dict[str, Any]] = {"scaling": 0.5}  # the paper's λ (module docstring)

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        max_abs_dense([it.data for it in items], self._accumulators(key, 1)[0])  # type: ignore[misc]

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        assert isinstance(item.data, SparseTensor)
        max_abs_sparse(item.data.indices, item.data.values, self._accumulators(key, 1)[0])

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._accumulators(key, 1)[0].mul_(self.scaling)  # not used again: in place
