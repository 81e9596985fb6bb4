"""Secure aggregation (SecAgg+) sums: what a client submits and how the server recovers FedAvg, DARE and
TIES from the secure sum. This module is the mathematics only; the apps that use it are
``fedmerge/flower/server/secagg.py`` (strategy, workflow, the ServerApp's factory; the app is
``server/secagg.py``), ``clients/secagg.py`` (the NumPyClient and its
ClientApps) and ``simulations/secagg.py`` (``run_secagg``: simulation and in-process drivers).

**The Flower path that works (1.41).** SecAgg+ exists only on Flower's legacy path: the server runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext`` that holds a legacy
``flwr.server.strategy`` Strategy, and the client is ``ClientApp(client_fn=..., mods=[secaggplus_mod])``
around a ``NumPyClient``. The Message-API strategies (``flwr.serverapp.strategy``) have no SecAgg+ hook.
Here the strategy is ``SecAggStrategy`` (``flower/server/secagg.py``, a legacy FedAvg subclass that commits
each round's aggregate to the :class:`~fedmerge.store.ModelStore`); the plain reference path is the same
workflow and strategy without the workflow and the mod, the clients sending dense fp32 task vectors.

**Running.** ``run_secagg`` (``simulations/secagg.py``) drives the pair on Flower's simulation runtime
(:func:`fedmerge.flower.simulation.run_simulation_app`: ``flwr run`` on a private SuperLink in simulation
mode, Ray). The ServerApp runs in Flower's simulation process; the settings travel with it, and each
round's report and each leg's traffic come back through :func:`fedmerge.flower.simulation.emit_report`.
(``server_app``, ``secure_client_app`` and ``plain_client_app`` read ``context.run_config``, so an app
directory naming them as components and holding only this module's keys would also run.)

**What a client submits** (τ_i its task vector, n_i its example count, W = ``weight-scale``, a public
power of two ≥ every n_i; the last array is always the weight n_i/W):

* ``fedavg``: [(n_i/W)·τ_i per tensor, n_i/W]; the server returns Σ(n_i/W)τ_i / Σ(n_i/W), FedAvg exactly;
* ``dare``:   the same with τ̃_i = m_i ⊙ τ_i / p, m_i the SplitMix64 mask of
  ``derive_generator(seed, round, i, tensor)`` (what ``dare_linear`` draws for client i), so the
  result is ``dare_linear(normalize=True)``; the server never needs the masks;
* ``ties``:   per tensor a (5, numel) array, τ̂_i = top-k(τ_i) trimmed on the client:
  [s_S·v_i·e(τ̂_i), (n_i/W)·max(τ̂_i, 0), (n_i/W)·min(τ̂_i, 0), s_c·c_i·1[τ̂_i > 0], s_c·c_i·1[τ̂_i < 0]]
  with v_i, c_i the vote and divisor weights of :class:`~fedmerge.aggregators.ties.Ties` (1, or n_i
  for ``weighted`` / ``weight``; s = 1/W then, else 1) and e = identity (``total``) or sign
  (``frequency``). The server unscales the five sums S, P, N, Pc, Nc and finishes with fedmerge's own
  :func:`~fedmerge.aggregators.kernels.disjoint_mean`: λ·(S ≥ 0 ? P/Pc : N/Nc).

Flower's SecAgg+ is used as a pure sum: each FitRes says ``num_examples = 1`` and ``max_weight = 1``,
so Flower's own weight factor is exactly Q and the workflow returns (1/m)·Σ x̂_i over the m clients
whose masked vectors were summed; the server multiplies by m and snaps the result back to the
quantization grid, recovering the exact integer sum. The true n_i travel only inside the masked vector.

**Quantization error bound.** Flower maps x ∈ [−c, c] to (x + c)·Q/(2c) and rounds stochastically, so
each client's value moves by less than one step Δ = 2c/Q (by 0 if it lies on the grid), and a sum of m
clients by less than m·Δ. ``clipping-range`` c, ``quantization-range`` Q and W are powers of two with
2cW ≤ Q, so n_i/W, unit counts and ±1 votes lie on the grid: weights, counts and frequency votes are
summed *exactly*. Hence, per coordinate (plus fp32 rounding of the stored result):

* fedavg / dare: |τ_secagg − τ_plain| < m·Δ·W / Σ n_i;
* ties: |τ_secagg − τ_plain| < λ·m·Δ·W / D_j (D_j > 0 the exact divisor Pc or Nc of the elected
  sign; 0 where D_j = 0, as no client then submitted anything but exact zeros for that sign)
  wherever the elected sign is the same. With ``frequency`` election the vote is exact, so it
  always is; with ``total`` election the vote S carries an error < m·Δ/s_S and coordinates with
  |S| below that (near-ties) may elect the other sign. TIES-as-sums is exact up to quantization
  everywhere else; those coordinates are counted (``ambiguous_coordinates`` in the manifest).

A value outside [−c, c] would be clipped silently by Flower; the client refuses instead
(:class:`SecAggRangeError`), and SecAgg+ then treats it as a dropped client. A round commits only if
at least ``min-summed`` (default 3) clients' vectors were summed: Flower's mask generator folds each
256-bit seed to 32 bits, so a client whose only pairwise mask is shared with one neighbour (a sum of
two) could have that mask brute-forced once the server has reconstructed its self-mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast

import numpy as np
import torch
from flwr.common import (
    Scalar,
)

from fedmerge.aggregators import create
from fedmerge.aggregators.kernels import disjoint_mean
from fedmerge.aggregators.sparsify import dare_drop, trim
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError, InvalidSubmission
from fedmerge.federation_settings import FederationSettings, field_type
from fedmerge.seeds import derive_generator

log = logging.getLogger("fedmerge.secagg")

SecAggMode = Literal["fedavg", "ties", "dare"]
MODES: tuple[str, ...] = ("fedavg", "ties", "dare")
SUBMISSIONS = {"fedavg": "weighted-sum", "dare": "dare-weighted-sum", "ties": "ties-five-sums"}
MAX_REASON = 400


class SecAggRangeError(InvalidSubmission):
    """A client's submission has a coordinate outside [−clipping-range, clipping-range]."""


def _is_pow2(x: float) -> bool:
    if not (x > 0 and math.isfinite(x)):
        return False
    mantissa, _ = math.frexp(x)
    return mantissa == 0.5


@dataclass(frozen=True)
class SecAggConfig(FederationSettings):
    """Settings of a secure-aggregation run; ``from_mapping`` takes the kebab-case run-config keys.

    ``secure=False`` runs the same rounds on the plain legacy path (dense fp32 task vectors, the
    aggregate computed by fedmerge's aggregator) as the reference.
    """

    store: str = ""
    num_rounds: int = 1
    local_epochs: int = 1
    mode: str = "fedavg"
    secure: bool = True
    num_clients: int = 4
    weight_scale: int = 1024
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    min_summed: int = 3
    timeout_s: float = 300.0
    ties_density: float = 0.2
    ties_sign_election: str = "frequency"
    ties_vote_weighting: str = "unweighted"
    ties_divisor: str = "weight"
    ties_scaling: float = 1.0
    dare_density: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"secagg mode must be one of {MODES}, got {self.mode!r}")
        if self.num_rounds < 1 or self.num_clients < 2:
            raise ConfigError(
                f"need num-rounds ≥ 1 and num-clients ≥ 2 (SecAgg+ sums over at least two clients), "
                f"got {self.num_rounds} and {self.num_clients}"
            )
        for name in ("clipping_range", "quantization_range", "weight_scale", "modulus_range"):
            if not _is_pow2(float(getattr(self, name))):
                raise ConfigError(
                    f"{name.replace('_', '-')} must be a power of two (so weights and counts are exact on "
                    f"the quantization grid), got {getattr(self, name)!r}"
                )
        if 2 * self.clipping_range * self.weight_scale > self.quantization_range:
            raise ConfigError(
                f"need 2·clipping-range·weight-scale ≤ quantization-range so n/weight-scale lies on the "
                f"grid; got 2·{self.clipping_range}·{self.weight_scale} > {self.quantization_range}"
            )
        if self.num_clients * self.quantization_range >= self.modulus_range:
            raise ConfigError(
                f"num-clients·quantization-range must stay below modulus-range or the sum wraps; got "
                f"{self.num_clients}·{self.quantization_range} ≥ {self.modulus_range}"
            )
        if self.min_summed > self.num_clients:
            raise ConfigError(
                f"min-summed={self.min_summed} exceeds num-clients={self.num_clients}; no round could commit"
            )
        if self.min_summed < 2:
            raise ConfigError(
                f"min-summed must be ≥ 2 (a sum of one client is that client), got {self.min_summed}"
            )
        if not 0.0 < self.dare_density <= 1.0 or not 0.0 < self.ties_density <= 1.0:
            raise ConfigError(
                "ties-density and dare-density must be in (0, 1], got "
                f"{self.ties_density} and {self.dare_density}"
            )
        # the TIES options are validated by the aggregator itself
        create("ties", **self.ties_params())

    @staticmethod
    def from_mapping(values: Mapping[str, Any]) -> SecAggConfig:
        """Build from kebab-case keys (``num-clients`` …); unknown keys raise :class:`ConfigError`."""
        known = {f.name.replace("_", "-"): f for f in fields(SecAggConfig)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown secagg settings {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            f = known[key]
            kind = field_type(f)
            assert kind is not None  # every SecAggConfig field is a scalar
            if kind is bool and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes")
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            kwargs[f.name] = kind(value)
        return SecAggConfig(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def step(self) -> float:
        """Δ = 2c/Q, one quantization step."""
        return 2 * self.clipping_range / self.quantization_range

    def ties_params(self) -> dict[str, Any]:
        return {
            "density": self.ties_density,
            "sign_election": self.ties_sign_election,
            "vote_weighting": self.ties_vote_weighting,
            "divisor": self.ties_divisor,
            "scaling": self.ties_scaling,
        }

    def method(self) -> tuple[str, dict[str, Any]]:
        """The fedmerge aggregator (name, params) this run's aggregate equals."""
        if self.mode == "fedavg":
            return "fedavg", {}
        if self.mode == "dare":
            return "dare_linear", {
                "density": self.dare_density,
                "normalize": True,
                "rescale": "inverse",
                "mask_rng": "splitmix64",
            }
        return "ties", self.ties_params()

    def ties_scales(self) -> tuple[float, float]:
        """(s_S, s_c): the public scales of the vote and count rows (1/W where the factor is n_i)."""
        w = 1.0 / self.weight_scale
        return (
            w if self.ties_vote_weighting == "weighted" else 1.0,
            w if self.ties_divisor == "weight" else 1.0,
        )

    def client_config(self, round_: int, names: Sequence[str]) -> dict[str, Scalar]:
        """What a client needs (sent in FitIns.config): every setting but the store, the round, the names."""
        out: dict[str, Scalar] = {k: v for k, v in self.to_mapping().items() if k != "store"}
        out["round"] = round_
        out["names"] = ",".join(names)
        return out


# ---------------------------------------------------------------------------------------- submissions
def submission_terms(
    delta: Mapping[str, torch.Tensor],
    names: Sequence[str],
    num_examples: int,
    cfg: SecAggConfig,
    *,
    round_: int,
    client: int | str,
) -> list[np.ndarray]:
    """The float64 arrays a client submits under ``cfg.mode`` (see the module docstring), weight last."""
    if not 1 <= num_examples <= cfg.weight_scale:
        raise ConfigError(
            f"num-examples={num_examples} must be in [1, weight-scale={cfg.weight_scale}]; raise weight-scale"
        )
    w = num_examples / cfg.weight_scale
    out: list[np.ndarray] = []
    for name in names:
        x = delta[name].detach().float()
        if cfg.mode == "dare":
            gen = derive_generator(cfg.seed, round_, client, name)
            x = cast(torch.Tensor, dare_drop(x, cfg.dare_density, gen, "inverse", "splitmix64"))
        if cfg.mode in ("fedavg", "dare"):
            out.append(w * x.double().numpy())
            continue
        t = cast(torch.Tensor, trim(x, cfg.ties_density)).reshape(-1).double()
        s_vote, s_count = cfg.ties_scales()
        vote = (num_examples if cfg.ties_vote_weighting == "weighted" else 1.0) * s_vote
        count = (num_examples if cfg.ties_divisor == "weight" else 1.0) * s_count
        e = t if cfg.ties_sign_election == "total" else torch.sign(t)
        rows = torch.stack(
            [
                vote * e,
                w * t.clamp(min=0),
                w * t.clamp(max=0),
                count * (t > 0).double(),
                count * (t < 0).double(),
            ]
        )
        out.append(rows.numpy())
    out.append(np.array([w], dtype=np.float64))
    return out


def check_range(terms: Sequence[np.ndarray], clipping_range: float) -> None:
    """Raise :class:`SecAggRangeError` if any value lies outside [−c, c] (Flower would clip it silently)."""
    worst = max(float(np.abs(a).max()) if a.size else 0.0 for a in terms)
    if worst > clipping_range:
        raise SecAggRangeError(
            f"a submitted value has magnitude {worst:.4g} > clipping-range={clipping_range}; "
            "raise clipping-range (a power of two) or weight-scale"
        )


@dataclass(frozen=True)
class SumResult:
    """The aggregate recovered from the sums and what the server learned with it."""

    aggregate: StateDict
    total_examples: int
    error_bound: float
    ambiguous_coordinates: int = 0


def snap_sum(mean: np.ndarray, num_clients: int, cfg: SecAggConfig) -> np.ndarray:
    """m·mean rounded to the grid {k·Δ − m·c}: the exact dequantized sum (removes Flower's float noise)."""
    c, step = cfg.clipping_range, cfg.step
    shifted = np.asarray(mean, dtype=np.float64) * num_clients + num_clients * c
    return np.rint(shifted / step) * step - num_clients * c


def aggregate_from_sums(
    sums: Sequence[np.ndarray],
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    cfg: SecAggConfig,
    num_clients: int,
) -> SumResult:
    """Finish the merge from the (snapped) sums alone: Σ-ratio for fedavg/dare, S,P,N,Pc,Nc for TIES."""
    if len(sums) != len(names) + 1:
        raise InvalidSubmission(f"expected {len(names) + 1} summed arrays, got {len(sums)}")
    W = cfg.weight_scale
    total_scaled = float(np.asarray(sums[-1]).reshape(-1)[0])
    total = round(total_scaled * W)
    if total < 1:
        raise InvalidSubmission(f"the summed weight is {total_scaled * W:g}; no client contributed examples")
    m_step = num_clients * cfg.step
    out: StateDict = {}
    if cfg.mode in ("fedavg", "dare"):
        for name, s in zip(names, sums, strict=False):
            agg = np.asarray(s, dtype=np.float64).reshape(shapes[name]) / total_scaled
            out[name] = torch.from_numpy(agg.astype(np.float32))
        return SumResult(out, total, m_step * W / total)
    s_vote, s_count = cfg.ties_scales()
    bound, ambiguous = 0.0, 0
    for name, s in zip(names, sums, strict=False):
        rows = np.asarray(s, dtype=np.float64).reshape(5, -1)
        S, P, N = rows[0] / s_vote, rows[1] * W, rows[2] * W
        Pc, Nc = np.rint(rows[3] / s_count), np.rint(rows[4] / s_count)
        acc = [torch.from_numpy(a.astype(np.float32)) for a in (S, P, N, Pc, Nc)]
        out[name] = disjoint_mean(acc, cfg.ties_scaling).reshape(shapes[name])
        divisor = np.where(S >= 0, Pc, Nc)
        # a sign no client took sums exact zeros (on the grid): only D_j > 0 carries quantization error
        value_bound = np.where(
            divisor > 0, abs(cfg.ties_scaling) * m_step * W / np.maximum(divisor, 1.0), 0.0
        )
        bound = max(bound, float(value_bound.max()) if value_bound.size else 0.0)
        if cfg.ties_sign_election == "total":
            near = (np.abs(S) < m_step / s_vote) & ((P != 0) | (N != 0))
            ambiguous += int(near.sum())
    return SumResult(out, total, bound, ambiguous)


# ---------------------------------------------------------------------------------------- byte counting
