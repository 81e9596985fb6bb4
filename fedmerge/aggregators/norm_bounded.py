"""Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): clip each client's
whole delta to an L2 bound M before folding it into an inner streaming method.

    τ̄_i = τ_i · min(1, M / ‖τ_i‖₂),    τ = inner(τ̄_1, …, τ̄_N)

``create("norm_bounded", inner="fedavg", max_norm=M, inner_params={...})``. The inner method must
be a streaming aggregator using the standard ``add``/``finalize`` (FedAvg, task arithmetic, TIES,
DARE, DELLA, …); its per-client step, folds and accumulators are used as they are, so memory stays
O(P + group·P). Scaling a too-large delta makes one fp32 copy of that client's delta at a time.
The original norm of every client is kept in ``client_norms`` (an anomaly signal for the manifest).
This is also the clipping of DP-FedAvg when the clients cannot be trusted to clip themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import (
    Aggregator,
    ClientDelta,
    DeltaTensor,
    Prepared,
    create,
    get,
    register,
)
from fedmerge.delta.clipping import check_max_norm, clip_factor, delta_norm, scale_delta
from fedmerge.errors import ConfigError


@register
class NormBounded(Aggregator):
    tensorwise: ClassVar[bool] = False  # scores whole deltas (over every tensor at once)
    name: ClassVar[str] = "norm_bounded"
    averaging: ClassVar[bool] = True  # with the default inner (fedavg) and a bound above every norm
    identity_params: ClassVar[dict[str, Any]] = {"max_norm": 1e30}

    def __init__(
        self,
        *,
        inner: str = "fedavg",
        max_norm: float = 1.0,
        inner_params: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        cls = get(inner)
        standard = all(
            getattr(cls, m) is getattr(Aggregator, m) for m in ("add", "_admit", "_accepted", "finalize")
        )
        if not cls.streaming or not standard:
            raise ConfigError(
                f"norm_bounded needs a streaming inner method with the standard add/finalize; {inner!r} is "
                "not one (for buffering methods clip with fedmerge.privacy.clip_delta before add)"
            )
        if inner == self.name:
            raise ConfigError("norm_bounded cannot wrap itself")
        self.max_norm = check_max_norm(max_norm)
        self.inner: Aggregator = create(inner, **{**common, **dict(inner_params or {})})
        self.stochastic = self.inner.stochastic  # type: ignore[misc]
        self.client_norms: dict[Any, float] = {}
        self._norm = 0.0  # ‖Δ‖₂ of the client being added, recorded once it is accepted

    @property
    def params(self) -> dict[str, Any]:
        return {
            **super().params,
            "max_norm": self.max_norm,
            "inner": self.inner.name,
            "inner_params": self.inner.params,
        }

    @property
    def dp_calibrated(self) -> bool:
        return self.inner.dp_calibrated  # clipping here does not change what the inner's output is

    def begin(self, reference_shapes: Mapping[str, Any]) -> None:
        super().begin(reference_shapes)
        self.inner.begin(reference_shapes)
        self.inner._acc = self._acc  # one set of accumulators, owned here, folded by the inner's kernels
        self.client_norms = {}

    def _admit(self, client_id: str | int, client_delta: ClientDelta) -> ClientDelta:
        """The delta clipped to ‖Δ‖₂ ≤ max_norm (a non-floating one is passed on: :meth:`add` rejects
        it, naming the tensor)."""
        if not all(v.dtype.is_floating_point for v in client_delta.values()):
            return client_delta
        self._norm = delta_norm(client_delta)
        factor = clip_factor(self._norm, self.max_norm)
        return client_delta if factor == 1.0 else scale_delta(client_delta, factor)

    def _accepted(self, client_id: str | int, weight: float) -> None:
        self.client_norms[client_id] = self._norm

    def _generator(self, client: str | int, key: str) -> torch.Generator:
        return self.inner._generator(client, key)

    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        return self.inner._prepare(key, x, generator)

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        self.inner._fold_dense(key, items, weights)

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        self.inner._fold_sparse(key, item, weight)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        self.inner._num_clients, self.inner._total_weight = self._num_clients, self._total_weight
        return self.inner._finalize_tensor(key, shape)
