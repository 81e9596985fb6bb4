"""Server optimisers applied to the merged delta after any aggregator (Reddi et al., 2021, "Adaptive
Federated Optimization"; Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification").

The aggregator's output Δ_t (the merged task vector of round t; −g_t in Reddi's notation, a
pseudo-gradient that points *downhill*) is turned into the step x_{t+1} − x_t the round commits:

* ``avgm`` (FedAvgM):   v_t = β·v_{t−1} + Δ_t;                         x_{t+1} = x_t + η·v_t
* ``adam`` (FedAdam):   m_t = β₁·m_{t−1} + (1−β₁)·Δ_t
                        v_t = β₂·v_{t−1} + (1−β₂)·Δ_t²;                x_{t+1} = x_t + η·m_t / (√v_t + τ)
* ``yogi`` (FedYogi):   m_t as Adam
                        v_t = v_{t−1} − (1−β₂)·Δ_t²·sign(v_{t−1} − Δ_t²); step as Adam
* ``adagrad`` (FedAdagrad): m_t as Adam;  v_t = v_{t−1} + Δ_t²;       step as Adam
* ``none``: the step is Δ_t (the aggregator's merge, unchanged; no state).

Everything is computed in fp32 on the delta's device. m_{−1} = 0 and v_{−1} = τ² (Reddi's Algorithm 2
asks v_{−1} ≥ τ²; ``initial_accumulator`` overrides it); the momentum of FedAvgM starts at 0 (so v_0 = Δ_0).

Defaults (η and τ per optimiser, when ``lr`` / ``tau`` are left ``None``) are Flower's strategies':
avgm η = 1; adam η = 0.1, τ = 1e-9; yogi η = 0.01, τ = 1e-3; adagrad η = 0.1, τ = 1e-9; β₁ = 0.9,
β₂ = 0.99 (Reddi's experiments), FedAvgM β = 0.9 (Hsu et al.).

Where Flower's ``flwr.server.strategy`` (1.x) differs from the paper, the paper is the default:

* Flower starts v at 0, not τ² (``initial_accumulator=0.0`` reproduces it);
* Flower's FedAdam multiplies η by √(1−β₂^(r+1)) / (1−β₁^(r+1)) in round r (Kingma & Ba's bias
  correction with the exponent one ahead of the step count); ``bias_correction=True`` applies
  Kingma & Ba's √(1−β₂^t) / (1−β₁^t) at step t = 1, 2, … (the paper has none);
* Flower's FedAdagrad fixes β₁ = 0 (no first moment); Reddi's Algorithm 2 keeps β₁ for all three;
* Flower's FedAvgM defaults to β = 0 (plain FedAvg with a server learning rate).

State: ``m/<name>``, ``v/<name>`` (fp32, the delta's shapes) and ``step`` (int64, the number of steps
taken). It is persisted with each committed version under :data:`STATE_PREFIX` + ``<kind>/`` (see
:func:`to_store` / :func:`from_store`), so a server killed and resumed reads the state of the version it
resumes from and continues bit-identically. A stored state of another optimiser is not carried over
(switching optimiser mid-run starts from fresh moments).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from fedmerge.errors import ConfigError, IncompatibleDeltasError

Kind = Literal["none", "avgm", "adam", "yogi", "adagrad"]
KINDS: tuple[str, ...] = get_args(Kind)
ADAPTIVE = ("adam", "yogi", "adagrad")
STATE_PREFIX = "server-optimizer/"
DEFAULT_LR = {"none": 1.0, "avgm": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1}
DEFAULT_TAU = {"none": 1e-9, "avgm": 1e-9, "adam": 1e-9, "yogi": 1e-3, "adagrad": 1e-9}

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimiser's settings; ``lr`` and ``tau`` of ``None`` take the optimiser's default."""

    kind: str = "none"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float | None = None
    bias_correction: bool = False
    initial_accumulator: float | None = None  # v_{-1}; None = τ²

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"server-optimizer={self.kind!r} must be one of {list(KINDS)}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"server-lr={self.lr} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"server-momentum={self.momentum} must be in [0, 1)")
        if not 0.0 <= self.beta1 < 1.0:
            problems.append(f"server-beta1={self.beta1} must be in [0, 1)")
        if not 0.0 <= self.beta2 < 1.0:
            problems.append(f"server-beta2={self.beta2} must be in [0, 1)")
        if self.tau is not None and not self.tau > 0:
            problems.append(f"server-tau={self.tau} must be > 0 (it keeps m/(√v+τ) finite)")
        if self.initial_accumulator is not None and not self.initial_accumulator >= 0:
            problems.append(f"initial_accumulator={self.initial_accumulator} must be ≥ 0")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def eta(self) -> float:
        """η: ``lr`` or the optimiser's default."""
        return DEFAULT_LR[self.kind] if self.lr is None else float(self.lr)

    @property
    def epsilon(self) -> float:
        """τ: ``tau`` or the optimiser's default."""
        return DEFAULT_TAU[self.kind] if self.tau is None else float(self.tau)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def params(self) -> dict[str, Any]:
        """The effective settings, as recorded in a version's manifest."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out.update(lr=self.eta, tau=self.epsilon)
        if self.kind == "avgm":
            for k in ("beta1", "beta2", "tau", "bias_correction", "initial_accumulator"):
                out.pop(k, None)
        elif self.kind in ADAPTIVE:
            out.pop("momentum", None)
            if self.kind == "adagrad":
                out.pop("beta2", None)
        return out


def init_state(opt: ServerOptimizer, delta: Mapping[str, torch.Tensor]) -> State:
    """The state before the first step: m = 0, v = τ² (``initial_accumulator``), step = 0; FedAvgM's
    momentum ``v`` = 0. Empty for ``none``."""
    if not opt.enabled:
        return {}
    state: State = {"step": torch.zeros((), dtype=torch.int64)}
    for name, d in delta.items():
        if opt.kind == "avgm":
            state[f"v/{name}"] = torch.zeros(d.shape, dtype=torch.float32, device=d.device)
        else:
            v0 = opt.epsilon**2 if opt.initial_accumulator is None else opt.initial_accumulator
            state[f"m/{name}"] = torch.zeros(d.shape, dtype=torch.float32, device=d.device)
            state[f"v/{name}"] = torch.full(d.shape, v0, dtype=torch.float32, device=d.device)
    return state


def step(
    opt: ServerOptimizer, state: Mapping[str, torch.Tensor] | None, delta: Mapping[str, torch.Tensor]
) -> tuple[State, State]:
    """One server step: (x_{t+1} − x_t per tensor in fp32, the new state). ``state`` None or empty
    starts from :func:`init_state`; the inputs are not modified. A state missing one of the delta's
    names, or holding it with another shape, raises :class:`IncompatibleDeltasError` naming it."""
    if not opt.enabled:
        return {k: v.float() for k, v in delta.items()}, {}
    old = dict(state) if state else init_state(opt, delta)
    t = int(old["step"]) + 1
    new: State = {"step": torch.tensor(t, dtype=torch.int64)}
    out: State = {}
    eta = opt.eta
    if opt.kind in ADAPTIVE and opt.bias_correction:
        eta = eta * (1.0 - opt.beta2**t) ** 0.5 / (1.0 - opt.beta1**t)
    for name, d in delta.items():
        g = d.float()
        v_old = _moment(old, "v", name, g)
        if opt.kind == "avgm":
            v = v_old.mul(opt.momentum).add_(g)
            out[name] = v * eta
            new[f"v/{name}"] = v
            continue
        m = _moment(old, "m", name, g).mul(opt.beta1).add_(g, alpha=1.0 - opt.beta1)
        g2 = g * g
        if opt.kind == "adam":
            v = v_old.mul(opt.beta2).add_(g2, alpha=1.0 - opt.beta2)
        elif opt.kind == "yogi":
            v = v_old - (1.0 - opt.beta2) * g2 * torch.sign(v_old - g2)
        else:  # adagrad
            v = v_old + g2
        out[name] = m.div(v.sqrt().add_(opt.epsilon)).mul_(eta)
        new[f"m/{name}"] = m
        new[f"v/{name}"] = v
    return out, new


def _moment(state: Mapping[str, torch.Tensor], which: str, name: str, like: torch.Tensor) -> torch.Tensor:
    key = f"{which}/{name}"
    t = state.get(key)
    if t is None:
        raise IncompatibleDeltasError(
            f"server optimiser state has no {key!r}; the merged delta has tensor {name!r} that the "
            "stored state does not (a state from another model?)",
            key=name,
        )
    if tuple(t.shape) != tuple(like.shape):
        raise IncompatibleDeltasError(
            f"server optimiser state {key!r} has shape {tuple(t.shape)}, the delta {tuple(like.shape)}",
            key=name,
        )
    return t.to(device=like.device, dtype=torch.float32)


def to_store(opt: ServerOptimizer, state: Mapping[str, torch.Tensor]) -> State:
    """``state`` under the names it is persisted with: :data:`STATE_PREFIX` ``<kind>/<key>``."""
    return {f"{STATE_PREFIX}{opt.kind}/{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def from_store(opt: ServerOptimizer, stored: Mapping[str, torch.Tensor] | None) -> tuple[State, State]:
    """Split a version's stored state into (this optimiser's state, everything else). The optimiser
    state is empty when the version holds none for ``opt.kind`` (a fresh start)."""
    mine: State = {}
    rest: State = {}
    prefix = f"{STATE_PREFIX}{opt.kind}/"
    for k, v in (stored or {}).items():
        if k.startswith(prefix):
            mine[k[len(prefix) :]] = v
        elif not k.startswith(STATE_PREFIX):
            rest[k] = v
    return mine, rest


def without_optimizer_state(stored: Mapping[str, torch.Tensor] | None) -> State | None:
    """A version's stored state without any server optimiser's tensors (None when nothing is left)."""
    rest = {k: v for k, v in (stored or {}).items() if not k.startswith(STATE_PREFIX)}
    return rest or None


def round_step(
    opt: ServerOptimizer, stored: Mapping[str, torch.Tensor] | None, merged: Mapping[str, torch.Tensor]
) -> tuple[State, State]:
    """What a round does: read the optimiser's state from the base version's ``stored`` state, take one
    step on ``merged``. Returns (the delta to commit, the optimiser's tensors to persist with it, under
    their stored names). With ``none``: (``merged`` as given, {})."""
    if not opt.enabled:
        return dict(merged), {}
    state, _ = from_store(opt, stored)
    out, new = step(opt, state or None, merged)
    return {k: out[k].to(merged[k].dtype) for k in merged}, to_store(opt, new)
