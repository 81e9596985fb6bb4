"""Secure aggregation (SecAgg+) rounds: FedAvg, TIES-as-sums and DARE task vectors, committed to the store.

**The Flower path that works (1.41).** SecAgg+ exists only on Flower's legacy path: the server runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext`` that holds a legacy
``flwr.server.strategy`` Strategy, and the client is ``ClientApp(client_fn=..., mods=[secaggplus_mod])``
around a ``NumPyClient``. The Message-API strategies (``flwr.serverapp.strategy``) have no SecAgg+ hook.
Here the strategy is :class:`SecAggStrategy` (a legacy FedAvg subclass that commits each round's
aggregate to the :class:`~fedmerge.store.ModelStore`); the plain reference path is the same
workflow and strategy without the workflow and the mod, the clients sending dense fp32 task vectors.

**Running.** :func:`run_secagg` drives the pair with ``flwr.simulation.run_simulation`` (Ray). It is
deprecated and passes an empty run config, but it runs the ServerApp in the calling process, so the
settings reach it by closure and the per-round reports come back through a callback, as the project's
other simulation tests and the demo do. ``flwr run DIR`` would need an app directory with its own
``pyproject.toml`` and a SuperLink in a subprocess, from which results come back only through the store.
(:data:`server_app`, :data:`secure_client_app` and :data:`plain_client_app` read ``context.run_config``,
so an app directory naming them as components and holding only this module's keys would also run.)

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

import hashlib
import logging
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, cast

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmerge.aggregators import create
from fedmerge.aggregators.base import derive_generator
from fedmerge.aggregators.kernels import disjoint_mean
from fedmerge.aggregators.sparsify import dare_drop, trim
from fedmerge.delta.state_dict import StateDict, floating_names
from fedmerge.errors import ConfigError, InvalidSubmission
from fedmerge.flower.rounds import RoundAborted, check_latest_unmoved, ensure_base, start_round
from fedmerge.store import Contributor, ModelStore, Version
from fedmerge_simulations.local_round import local_round
from fedmerge_simulations.tasks import get_task
from fedmerge_simulations.tasks.training import seed_from, torch_threads

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
class SecAggConfig:
    """Settings of a secure-aggregation run; ``from_mapping`` takes the kebab-case run-config keys.

    ``secure=False`` runs the same rounds on the plain legacy path (dense fp32 task vectors, the
    aggregate computed by fedmerge's aggregator) as the reference.
    """

    store: str = ""
    task: str = "digits"
    mode: str = "fedavg"
    secure: bool = True
    num_rounds: int = 1
    num_clients: int = 4
    seed: int = 0
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    local_epochs: int = 1
    lr: float = 0.1
    batch_size: int = 32
    weight_scale: int = 1024
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    min_summed: int = 3
    timeout_s: float = 300.0
    server_eval: bool = True
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
            kind = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
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
def wire_bytes(message: Message) -> int:
    """Serialized size of ``message`` as Flower 1.41 moves it between SuperLink and SuperNode: the sum of
    the deflated inflatable objects (message, record dict, records, arrays, array chunks), each once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass
class Traffic:
    """Per-round (Flower's group id) byte and message counts, and the time spent counting."""

    downlink: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    uplink: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    counting_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class CountingGrid(Grid):
    """A Grid that forwards everything to ``inner`` and counts the serialized bytes of each message
    pushed (server → client) and each reply pulled (client → server), keyed by the message's group id."""

    def __init__(self, inner: Grid, pull_interval: float = 0.05) -> None:
        self.inner = inner
        self.traffic = Traffic()
        self.pull_interval = pull_interval

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def _count(self, messages: Iterable[Message], table: dict[str, int]) -> None:
        for msg in messages:
            t0 = time.perf_counter()
            group = msg.metadata.group_id
            table[group] += wire_bytes(msg)
            self.traffic.messages[group] += 1
            self.traffic.counting_s[group] += time.perf_counter() - t0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        ids = list(self.inner.push_messages(msgs))
        self._count(msgs, self.traffic.downlink)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count(replies, self.traffic.uplink)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        out: list[Message] = []
        while pending and (timeout is None or time.monotonic() < end):
            replies = list(self.pull_messages(pending))
            out.extend(replies)
            pending.difference_update(r.metadata.reply_to_message_id for r in replies)
            if pending and not replies:
                time.sleep(self.pull_interval)
        return out


# ---------------------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class SecAggRound:
    """One committed round: bytes per direction (serialized, all protocol stages), time, what was learned."""

    round: int
    version_id: str
    parent_id: str
    mode: str
    secure: bool
    num_clients: int
    failures: int
    uplink_bytes: int
    downlink_bytes: int
    messages: int
    wall_s: float
    total_examples: int
    error_bound: float
    ambiguous_coordinates: int
    metrics: dict[str, float]


class RecordingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, remembering the effective share count and threshold of each round."""

    effective: dict[str, int]

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = bool(super().setup_stage(grid, context, state))
        self.effective = {
            "num_shares": int(state.num_shares),
            "reconstruction_threshold": int(state.threshold),
            "sampled": len(state.sampled_node_ids),
        }
        return ok


def _as_share_param(value: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction: 1.0 means all, 5.0 means five."""
    return int(value) if value > 1.0 else float(value)


class SecAggStrategy(FedAvg):
    """Legacy FedAvg that sends full base weights, and commits the round's aggregate task vector."""

    def __init__(
        self,
        cfg: SecAggConfig,
        store: ModelStore,
        grid: CountingGrid,
        workflow: RecordingSecAggPlusWorkflow | None,
        on_round: Callable[[SecAggRound], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.num_clients,
            min_evaluate_clients=cfg.num_clients, min_available_clients=cfg.num_clients,
        )  # fmt: skip
        self.cfg, self.store, self.grid, self.workflow, self.on_round = cfg, store, grid, workflow, on_round
        self.names: list[str] = []
        self.base: Version | None = None
        self.first_round = 1
        self.started: dict[int, float] = {}
        self.reports: list[SecAggRound] = []
        self.evaluate_weights = None
        if cfg.server_eval:
            from fedmerge_server.app import task_evaluator

            self.evaluate_weights = task_evaluator(cfg.task, cfg.seed)

    def __repr__(self) -> str:
        return f"SecAggStrategy(mode={self.cfg.mode!r}, secure={self.cfg.secure})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        cfg = self.cfg
        self.base = ensure_base(
            self.store, lambda: get_task(cfg.task).pretrained_base(cfg.seed), name=cfg.task
        )
        self.first_round = start_round(self.base)
        weights = self.store.materialize(self.base)
        self.names = floating_names(weights)
        if len(self.names) != len(weights):
            raise ConfigError(
                f"task {cfg.task!r} has non-floating state {sorted(set(weights) - set(self.names))}; "
                "secure-aggregation rounds send floating tensors only"
            )
        return ndarrays_to_parameters([weights[n].numpy() for n in self.names])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.started[server_round] = time.perf_counter()
        config = self.cfg.client_config(self.first_round + server_round - 1, self.names)
        fit_ins = FitIns(parameters, config)
        clients = client_manager.sample(
            num_clients=self.cfg.num_clients, min_num_clients=self.cfg.num_clients
        )
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) < self.cfg.min_summed:
            log.warning(
                "round %d: %d results < min-summed=%d; nothing committed", server_round, len(results),
                self.cfg.min_summed,
            )  # fmt: skip
            return None, {}
        assert self.base is not None
        round_ = self.first_round + server_round - 1
        base = self.base
        weights = self.store.materialize(base)
        shapes = {n: tuple(weights[n].shape) for n in self.names}
        name, params = self.cfg.method()
        aggregator_params = create(name, seed=self.cfg.seed, round=round_, **params).params
        pids = sorted(int(cast(int, res.metrics.get("partition-id", -1))) for _, res in results)
        if self.cfg.secure:
            m = len(results)
            means = parameters_to_ndarrays(results[0][1].parameters)
            sums = [snap_sum(a, m, self.cfg) for a in means]
            result = aggregate_from_sums(sums, self.names, shapes, self.cfg, m)
            contributors = [Contributor(f"client-{p}", 0, "") for p in pids]
        else:
            result, contributors = self._plain(results, round_, shapes, name, params)
        merged = result.aggregate
        new = {k: weights[k] + merged[k].to(weights[k].dtype) for k in self.names}
        group = str(server_round)
        traffic = self.grid.traffic
        metrics: dict[str, float] = {
            "clients": float(len(results)),
            "failures": float(len(failures)),
            "uplink-bytes": float(traffic.uplink[group]),
            "downlink-bytes": float(traffic.downlink[group]),
            "total-examples": float(result.total_examples),
        }
        if self.evaluate_weights is not None:
            metrics.update({f"server-{k}": float(v) for k, v in self.evaluate_weights(new).items()})
        check_latest_unmoved(self.store, base, round_)
        version = self.store.commit(
            merged,
            parents=[base.id],
            method=name,
            params={**aggregator_params, "mode": "full"},
            contributors=contributors,
            round=round_,
            metrics=metrics,
            privacy=None,
            metadata={
                "task": self.cfg.task,
                "secure_aggregation": self._secagg_record(result, len(results), failures),
            },
        )
        self.base = version
        wall = time.perf_counter() - self.started.get(server_round, time.perf_counter())
        report = SecAggRound(
            round=round_,
            version_id=version.id,
            parent_id=base.id,
            mode=self.cfg.mode,
            secure=self.cfg.secure,
            num_clients=len(results),
            failures=len(failures),
            uplink_bytes=traffic.uplink[group],
            downlink_bytes=traffic.downlink[group],
            messages=traffic.messages[group],
            wall_s=wall - traffic.counting_s[group],
            total_examples=result.total_examples,
            error_bound=result.error_bound,
            ambiguous_coordinates=result.ambiguous_coordinates,
            metrics=metrics,
        )
        self.reports.append(report)
        if self.on_round is not None:
            self.on_round(report)
        return ndarrays_to_parameters([new[n].numpy() for n in self.names]), {}

    def _plain(
        self,
        results: list[tuple[ClientProxy, FitRes]],
        round_: int,
        shapes: Mapping[str, tuple[int, ...]],
        name: str,
        params: Mapping[str, Any],
    ) -> tuple[SumResult, list[Contributor]]:
        """The reference: fedmerge's aggregator over the dense fp32 task vectors, client ids = partitions."""
        agg = create(name, seed=self.cfg.seed, round=round_, **params)
        agg.begin(shapes)
        contributors, total = [], 0
        for _, res in sorted(results, key=lambda r: int(cast(int, r[1].metrics["partition-id"]))):
            pid = int(cast(int, res.metrics["partition-id"]))
            arrays = parameters_to_ndarrays(res.parameters)
            delta = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(self.names, arrays, strict=True)}
            agg.add(delta, res.num_examples, client_id=pid)
            digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in arrays)).hexdigest()
            contributors.append(Contributor(f"client-{pid}", int(res.num_examples), digest))
            total += int(res.num_examples)
        return SumResult(agg.finalize(), total, 0.0), contributors

    def _secagg_record(
        self, result: SumResult, summed: int, failures: Sequence[Any]
    ) -> dict[str, Any] | None:
        if not self.cfg.secure:
            return None
        cfg = self.cfg
        effective = getattr(self.workflow, "effective", {}) if self.workflow is not None else {}
        reasons = [" ".join(str(f).split())[-MAX_REASON:] for f in failures]
        return {
            "protocol": "SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow, legacy DefaultWorkflow)",
            "submission": SUBMISSIONS[cfg.mode],
            "num_shares": int(effective.get("num_shares", 0)),
            "reconstruction_threshold": int(effective.get("reconstruction_threshold", 0)),
            "num_shares_setting": cfg.num_shares,
            "reconstruction_threshold_setting": cfg.reconstruction_threshold,
            "clipping_range": cfg.clipping_range,
            "quantization_range": cfg.quantization_range,
            "modulus_range": cfg.modulus_range,
            "weight_scale": cfg.weight_scale,
            "clients_summed": summed,
            "clients_sampled": int(effective.get("sampled", summed)),
            "dropped": reasons,
            "total_examples": result.total_examples,
            "error_bound": result.error_bound,
            "ambiguous_coordinates": result.ambiguous_coordinates,
        }


def serve(
    grid: Grid,
    context: Context,
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> list[SecAggRound]:
    """The server side of a run: ``num-rounds`` legacy rounds (SecAgg+ when ``secure``) on ``grid``,
    each aggregate committed to the store. Raises :class:`RoundAborted` if a round commits nothing."""
    cfg = SecAggConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
    if not cfg.store:
        raise ConfigError("set store=PATH: the model store that receives one version per round")
    counting = CountingGrid(grid)
    if traffic_out is not None:
        traffic_out.append(counting.traffic)
    workflow = None
    if cfg.secure:
        workflow = RecordingSecAggPlusWorkflow(
            num_shares=_as_share_param(cfg.num_shares),
            reconstruction_threshold=_as_share_param(cfg.reconstruction_threshold),
            max_weight=1.0, clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range,
            modulus_range=cfg.modulus_range, timeout=cfg.timeout_s,
        )  # fmt: skip
    with ModelStore.open(cfg.store) as store:
        strategy = SecAggStrategy(cfg, store, counting, workflow, on_round)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=workflow)(counting, legacy)
    if len(strategy.reports) < cfg.num_rounds:
        done = [r.round for r in strategy.reports]
        raise RoundAborted(
            f"only rounds {done} of {cfg.num_rounds} were committed: secure aggregation halted or fewer "
            f"than min-summed={cfg.min_summed} clients' vectors were summed (see the server log)"
        )
    return strategy.reports


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`serve` with ``context.run_config`` updated by ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, context, overrides, on_round, traffic_out)

    return app


class InProcessGrid(Grid):
    """A synchronous grid in the calling thread, for tests and debugging: every pushed message goes
    through a protobuf round trip (as on the wire), is handled by its node's ``ClientApp`` (mods
    included) with that node's persistent ``Context``, and the reply goes through a round trip back.
    Node i has ``partition-id = i``. An exception in the ClientApp becomes an error reply, as on a
    SuperNode. No Ray, no concurrency; the protocol and the client code are those of the simulation."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        from flwr.supercore.run import Run

        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self._next = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    @staticmethod
    def _wire(message: Message) -> Message:
        from flwr.common.serde import message_from_proto, message_to_proto

        return message_from_proto(message_to_proto(message))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        ids = []
        for msg in messages:
            self._next += 1
            mid = f"m{self._next:08d}"
            msg.metadata.__dict__["_message_id"] = mid
            received = self._wire(msg)
            try:
                reply = self.client_app(received, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # a SuperNode turns a ClientApp exception into an error reply
                reason = f"{type(exc).__name__}: {exc}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=received)
            self.replies[mid] = self._wire(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


# ---------------------------------------------------------------------------------------- client side
class SecAggClient(NumPyClient):
    """Trains on its partition and returns the submission terms (secure) or the dense fp32 task vector."""

    def __init__(self, context: Context) -> None:
        self._context = context

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from fedmerge_clients.app import node_partition, partition_for

        round_ = int(cast(int, config["round"]))
        names = str(config["names"]).split(",")
        cfg = SecAggConfig.from_mapping({k: v for k, v in config.items() if k not in ("round", "names")})
        pid, num = node_partition(self._context)
        task = get_task(cfg.task)
        data = partition_for(cfg.task, num, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)[pid]
        base = {
            n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in zip(names, parameters, strict=True)
        }
        with torch_threads(1):
            update = local_round(
                task, base, data, seed=cfg.seed, round_=round_, epochs=cfg.local_epochs, lr=cfg.lr,
                batch_size=cfg.batch_size,
            )  # fmt: skip
        metrics: dict[str, Scalar] = {"partition-id": pid}
        if not cfg.secure:
            dense = [update.delta[n].float().numpy() for n in names]
            return dense, data.num_examples, metrics
        terms = submission_terms(update.delta, names, data.num_examples, cfg, round_=round_, client=pid)
        check_range(terms, cfg.clipping_range)
        # Flower's stochastic rounding draws from numpy's global RNG: seed it so runs are reproducible
        np.random.seed(seed_from(cfg.seed, round_, pid, 0x5EC) % 2**32)
        return terms, 1, metrics


def _client_fn(context: Context) -> Any:
    return SecAggClient(context).to_client()


secure_client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
"""Clients of SecAgg+ rounds: the mod masks the submission; only masked integers leave the node."""

plain_client_app = ClientApp(client_fn=_client_fn)
"""Clients of the plain reference rounds: dense fp32 task vectors in the clear."""


def secaggplus_when_asked_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """``secaggplus_mod`` for messages that carry SecAgg+ settings, a pass-through for plain ones."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return cast(Message, call_next(msg, context))


client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_when_asked_mod])
"""Clients that serve secure and plain rounds alike (for runs that compare both on the same nodes)."""

server_app = make_server_app()


def run_secagg(
    config: Mapping[str, Any],
    *,
    engine: Literal["simulation", "inprocess"] = "simulation",
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> list[SecAggRound]:
    """Run ``config`` (kebab-case :class:`SecAggConfig` keys); returns the committed rounds.

    ``engine="simulation"``: Flower's simulation engine (Ray), ``num-clients`` SuperNodes with one CPU
    each. ``engine="inprocess"``: the same apps on an :class:`InProcessGrid` (fast, sequential).
    """
    return run_legs([config], engine=engine, on_round=on_round, traffic_out=traffic_out)[0]


def run_legs(
    configs: Sequence[Mapping[str, Any]],
    *,
    engine: Literal["simulation", "inprocess"] = "simulation",
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> list[list[SecAggRound]]:
    """Run several configs one after the other on the *same* nodes (one simulation, one Ray start);
    they must agree on ``num-clients``. Mixed secure and plain legs use :data:`client_app`."""
    cfgs = [SecAggConfig.from_mapping(c) for c in configs]
    if not cfgs or len({c.num_clients for c in cfgs}) != 1:
        raise ConfigError("run_legs needs at least one config, all with the same num-clients")
    kinds = {c.secure for c in cfgs}
    app = client_app if len(kinds) == 2 else secure_client_app if cfgs[0].secure else plain_client_app
    results: list[list[SecAggRound]] = []

    def serve_all(grid: Grid, context: Context) -> None:
        for config in configs:
            results.append(serve(grid, context, config, on_round, traffic_out))

    if engine == "inprocess":
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        grid = InProcessGrid(app, cfgs[0].num_clients)
        context = Context(
            run_id=grid.run.run_id,
            node_id=SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config={},
        )
        # messages read the process's task identity, set here as Flower's ServerApp runtime sets it
        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            1,
            grid.run.run_id,
            SUPERLINK_NODE_ID,
        )
        try:
            serve_all(grid, context)
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        return results
    if engine != "simulation":
        raise ConfigError(f"engine must be 'simulation' or 'inprocess', got {engine!r}")
    from flwr.simulation import run_simulation

    server = ServerApp()
    server.main()(serve_all)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server,
            app,
            num_supernodes=cfgs[0].num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    return results


__all__ = [
    "CountingGrid",
    "InProcessGrid",
    "RecordingSecAggPlusWorkflow",
    "SecAggClient",
    "SecAggConfig",
    "SecAggRangeError",
    "SecAggRound",
    "SecAggStrategy",
    "SumResult",
    "Traffic",
    "aggregate_from_sums",
    "check_range",
    "client_app",
    "make_server_app",
    "plain_client_app",
    "run_legs",
    "run_secagg",
    "secaggplus_when_asked_mod",
    "secure_client_app",
    "serve",
    "server_app",
    "snap_sum",
    "submission_terms",
    "wire_bytes",
]
