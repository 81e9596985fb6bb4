"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted
Averaging"), ``fisher``.

With client weights w_i (the paper's λ_i), diagonal Fisher information F_i of each client's model and
its task vector τ_i = θ_i − θ_base, coordinate by coordinate:

    F̃_i = F_i / ‖F_i‖ (``normalize=True``; over all of the client's tensors) or F_i,   G_i = F̃_i + floor
    τ = Σ_i w_i G_i τ_i / Σ_i w_i G_i

(the paper merges θ_i; since Σ w G (θ_base + τ_i) / Σ w G = θ_base + the above, merging task vectors is
the same). ``fisher_floor`` (default 1e-6, the authors' code) keeps the denominator positive where
every Fisher is 0; with ``fisher_floor=0`` such a coordinate is the plain weighted mean Σ w τ / Σ w.
A client added without a Fisher counts with F_i = 1 everywhere, so with no Fisher at all this is the
weighted average (fedavg). ``normalize`` (default False, the paper) is FusionBench's
``normalize_fisher_weight``.

Each client passes its Fisher beside its delta: ``add(delta, weight, fisher={name: F})`` with the
delta's names and shapes, finite and ≥ 0 (a squared gradient); anything else is refused with
:class:`~fedmerge.errors.InvalidSubmission` before any accumulator changes.

Streams: three O(P) fp32 accumulators per tensor — Σ w G τ, Σ w G and Σ w τ (for the all-zero-Fisher
fallback). Each client is folded as it arrives (its Fisher is needed with its delta), so ``group_size``
does not batch clients here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Unpack

import torch

from fedmerge.aggregators.base import AddOptions, Aggregator, ClientDelta, Prepared, dense_of, register
from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import check_shapes
from fedmerge.errors import AggregatorStateError, ConfigError, InvalidSubmission


@register
class Fisher(Aggregator):
    name: ClassVar[str] = "fisher"
    averaging: ClassVar[bool] = True
    side_inputs: ClassVar[tuple[str, ...]] = ("fisher",)

    def __init__(self, *, fisher_floor: float = 1e-6, normalize: bool = False, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        floor = float(fisher_floor)
        if not math.isfinite(floor) or floor < 0:
            raise ConfigError(f"fisher: fisher_floor must be finite and ≥ 0, got {fisher_floor!r}")
        if not isinstance(normalize, bool):
            raise ConfigError(f"fisher: normalize must be true or false, got {normalize!r}")
        self.fisher_floor = floor
        self.normalize = normalize
        self._fisher: dict[str, torch.Tensor] | None = None  # the Fisher of the client being folded

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "fisher_floor": self.fisher_floor, "normalize": self.normalize}

    def add(
        self,
        client_delta: ClientDelta,
        weight: float = 1.0,
        *,
        fisher: Mapping[str, torch.Tensor] | None = None,
        **options: Unpack[AddOptions],
    ) -> None:
        """Fold one client's delta with its diagonal Fisher ``fisher`` (None: F = 1); ``options``:
        ``client_id`` and ``generator`` as :meth:`Aggregator.add` takes them."""
        shapes = self._require_begun()
        client_id = options.get("client_id")
        cid = self._num_clients if client_id is None else client_id
        prepared: dict[str, torch.Tensor] | None = None
        if fisher is not None:
            check_shapes({k: tuple(v.shape) for k, v in fisher.items()}, shapes, what=f"client {cid} Fisher")
            prepared = {}
            for key in sorted(shapes):
                f = fisher[key]
                if not f.is_floating_point():
                    raise InvalidSubmission(
                        f"client {cid}: Fisher {key!r} has dtype {f.dtype}; it must be floating"
                    )
                f32 = f.detach().to(self.device, torch.float32).reshape(-1)
                if not bool(torch.isfinite(f32).all()) or bool((f32 < 0).any()):
                    raise InvalidSubmission(
                        f"client {cid}: Fisher {key!r} has negative or non-finite values; a diagonal "
                        "Fisher is a mean of squared gradients (finite, ≥ 0)"
                    )
                prepared[key] = f32
            if self.normalize:
                norm = math.sqrt(sum(float(f.square().sum()) for f in prepared.values()))
                if norm == 0.0:
                    raise InvalidSubmission(
                        f"client {cid}: its Fisher is 0 everywhere; it cannot be normalised"
                    )
                prepared = {k: f / norm for k, f in prepared.items()}
        self._flush()
        self._fisher = prepared
        try:
            super().add(client_delta, weight, **options)
            self._flush()  # fold now, with this client's Fisher
        finally:
            self._fisher = None

    def _g(self, key: str, numel: int) -> torch.Tensor:
        if self._fisher is None:
            return torch.full((numel,), 1.0 + self.fisher_floor, device=self.device)
        return self._fisher[key] + self.fisher_floor

    def _fold_one(self, key: str, x: torch.Tensor, weight: float) -> None:
        num, den, plain = self._accumulators(key, 3)
        g = self._g(key, num.numel()) * weight
        flat = x.reshape(-1).to(self.device, torch.float32)
        num.add_(g * flat)
        den.add_(g)
        plain.add_(flat, alpha=weight)

    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        for it, w in zip(items, weights, strict=True):
            self._fold_one(key, dense_of(it.data), w)

    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        assert isinstance(item.data, SparseTensor)
        num, den, plain = self._accumulators(key, 3)
        g = self._g(key, num.numel()) * weight
        idx = item.data.indices.to(self.device, torch.int64)
        vals = item.data.values.to(self.device, torch.float32)
        num.index_add_(0, idx, g[idx] * vals)
        den.add_(g)
        plain.index_add_(0, idx, vals * weight)

    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self._total_weight <= 0:
            raise AggregatorStateError(f"{self.name}: the client weights sum to 0; cannot normalise them")
        num, den, plain = self._accumulators(key, 3)
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den > 0, num / safe, plain / self._total_weight)
