"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

    trim:     τ̂_i = top-k(τ_i) by |·|, k = ⌊density · n⌋ per tensor (density 1: no trim)
    elect:    γ = sgn(Σ_i v_i τ̂_i)  ("total", the paper)   or  sgn(Σ_i v_i sgn(τ̂_i))  ("frequency");
              a zero vote elects +, as peft and mergekit do
    merge:    τ = λ · Σ_{i∈A} w_i τ̂_i / D,   A = {i : sgn(τ̂_i) = γ}   (disjoint mean)
              ``normalize=False``: D = 1, the agreeing values summed (mergekit's ``normalize: false``)

Where the references disagree, the default follows the paper (which has no client weights) and
peft: ``vote_weighting="unweighted"`` (v_i = 1) and ``divisor="count"`` (D = |A|). mergekit's
choices are the options ``vote_weighting="weighted"`` (v_i = w_i) and ``divisor="weight"``
(D = Σ_{i∈A} w_i, a weighted mean — the natural choice with weights = numbers of examples).
D = 0 (no agreeing entry) gives 0. ``keep_rounding`` ("floor" | "mergekit", see
:mod:`fedmerge.aggregators.sparsify`) chooses how k is rounded; ``int8_mask`` is mergekit's memory
option for its sign mask and is accepted for recipes: the mask is exact in any dtype, so it changes
nothing here. mergekit's ``lambda`` is ``scaling`` (``lambda`` is a Python keyword); its per-model
``weight`` is the ``add`` weight. mergekit's own defaults (density 1, weighted vote, weighted
divisor) are the named variant :data:`fedmerge.aggregators.mergekit.MERGEKIT_DEFAULTS` ``["ties"]``;
every difference is listed in docs/merging.md.

Streaming: election and disjoint mean are sums, so the server keeps five fp32 accumulators —
S = Σ v_i e(τ̂_i), P = Σ w_i max(τ̂_i, 0), N = Σ w_i min(τ̂_i, 0), and the positive/negative
divisors — O(P) whatever the number of clients. Trimming is fused into the fold as a per-client
magnitude threshold; clients that already sent top-k sparse deltas are folded over their non-zeros.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmerge.aggregators.base import Aggregator, DeltaTensor, Prepared, check_fraction, register
from fedmerge.aggregators.kernels import (
    VOTE_FREQUENCY,
    VOTE_TOTAL,
    disjoint_mean,
    sign_split_dense,
    sign_split_sparse,
    sign_split_sparse_group,
    topk_thresholds,
)
from fedmerge.aggregators.sparsify import check_keep_rounding, keep_count, trim
from fedmerge.delta.sparse import SparseTensor
from fedmerge.errors import ConfigError

SIGN_ELECTIONS = {"total": VOTE_TOTAL, "frequency": VOTE_FREQUENCY}


class SignConsensusAggregator(Aggregator):
    """Elect a sign per coordinate, then average the agreeing entries (TIES, DARE-TIES, DELLA).

    Sparse client tensors are folded in groups of ``group_size`` clients (``groups_sparse``), per
    block of coordinates, with results identical to folding them one by one."""

    groups_sparse: ClassVar[bool] = True
    param_attrs: ClassVar[tuple[str, ...]] = (
        "scaling",
        "sign_election",
        "vote_weighting",
        "divisor",
        "normalize",
        "int8_mask",
    )

    def __init__(
        self,
        *,
        scaling: float = 1.0,
        sign_election: str = "total",
        vote_weighting: str = "unweighted",
        divisor: str = "count",
        normalize: bool = True,
        int8_mask: bool = False,
        **common: object,
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if sign_election not in SIGN_ELECTIONS:
            raise ConfigError(f"sign_election must be one of {sorted(SIGN_ELECTIONS)}, got {sign_election!r}")
        if vote_weighting not in ("unweighted", "weighted"):
            raise ConfigError(f"vote_weighting must be 'unweighted' or 'weighted', got {vote_weighting!r}")
        if divisor not in ("count", "weight"):
            raise ConfigError(f"divisor must be 'count' or 'weight', got {divisor!r}")
        self.scaling = float(scaling)
        self.sign_election = sign_election
        self.vote_weighting = vote_weighting
        self.divisor = divisor
        self.normalize = bool(normalize)
        self.int8_mask = bool(int8_mask)  # mergekit's mask dtype: no effect on the values

    def _per_client(self, weight: float) -> tuple[float, float]:
        vote = weight if self.vote_weighting == "weighted" else 1.0
        count = weight if self.divisor == "weight" else 1.0
        return vote, count

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        votes, counts = zip(*(self._per_client(w) for w in weights), strict=True)
        sign_split_dense(
            [it.data for it in items],  # type: ignore[misc]
            [it.threshold for it in items],
            [it.tie_cut for it in items],
            votes,
            weights,
            counts,
            SIGN_ELECTIONS[self.sign_election],
            self._accumulators(key, 5),
        )

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        assert isinstance(item.data, SparseTensor)
        vote, count = self._per_client(weight)
        sign_split_sparse(
            item.data.indices,
            item.data.values,
            item.threshold,
            vote,
            weight,
            count,
            SIGN_ELECTIONS[self.sign_election],
            self._accumulators(key, 5),
        )

    def _fold_sparse_group(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        votes, counts = zip(*(self._per_client(w) for w in weights), strict=True)
        data = [it.data for it in items if isinstance(it.data, SparseTensor)]
        assert len(data) == len(items)
        sign_split_sparse_group(
            [d.indices for d in data],
            [d.values for d in data],
            [it.threshold for it in items],
            votes,
            weights,
            counts,
            SIGN_ELECTIONS[self.sign_election],
            self._accumulators(key, 5),
        )

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        acc = self._accumulators(key, 5)
        if not self.normalize:  # D = 1: the agreeing weighted values summed (mergekit normalize: false)
            S, P, N = acc[0], acc[1], acc[2]
            return torch.where(S >= 0, P, N).mul_(self.scaling)
        return disjoint_mean(acc, self.scaling)


@register
class Ties(SignConsensusAggregator):
    name: ClassVar[str] = "ties"
    averaging: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, object]] = {"density": 1.0, "divisor": "weight"}
    # rounds: weights are numbers of examples (a weighted disjoint mean); clients trimmed already (top-k)
    round_defaults: ClassVar[dict[str, object]] = {"divisor": "weight", "density": 1.0}

    def __init__(self, *, density: float = 0.2, keep_rounding: str = "floor", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.density = check_fraction("density", density)
        self.keep_rounding = check_keep_rounding(keep_rounding)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "density": self.density, "keep_rounding": self.keep_rounding}

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        if self.density >= 1.0:
            return Prepared(x)
        if isinstance(x, SparseTensor):
            return Prepared(trim(x, self.density, self.keep_rounding))
        return Prepared(x, threshold=-1.0)  # trimmed in the fold: thresholds are found per group, no copy

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        pending = [it for it in items if it.threshold < 0]
        tensors = [it.data for it in pending if isinstance(it.data, torch.Tensor)]
        if tensors:
            ks = [keep_count(t.numel(), self.density, self.keep_rounding) for t in tensors]
            for it, (threshold, tie_cut) in zip(pending, topk_thresholds(tensors, ks), strict=True):
                it.threshold, it.tie_cut = threshold, tie_cut
        super()._fold_dense(key, items, weights)
