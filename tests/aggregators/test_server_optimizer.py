"""Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) against a plain reference of each rule, against
Flower's own strategies where the two agree, and resumed from a store bit-identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.aggregators.server_optimizer import (
    STATE_PREFIX,
    ServerOptimizer,
    from_store,
    round_step,
    step,
    to_store,
    without_optimizer_state,
)
from fedmerge.errors import ConfigError, IncompatibleDeltasError
from fedmerge.store import ModelStore

SHAPES = {"w": (7, 5), "b": (5,)}
STEPS = 6


def deltas(seed: int, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(steps)]


def reference(opt: ServerOptimizer, seq: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """Each rule written out element by element in float64 (Reddi et al. Alg. 2, Hsu et al.)."""
    eta, tau, b1, b2, mu = opt.eta, opt.epsilon, opt.beta1, opt.beta2, opt.momentum
    v0 = tau**2 if opt.initial_accumulator is None else opt.initial_accumulator
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) if opt.kind == "avgm" else np.full(s, v0) for k, s in SHAPES.items()}
    steps = []
    for t, d in enumerate(seq, start=1):
        out = {}
        for k in SHAPES:
            g = d[k].double().numpy()
            if opt.kind == "avgm":
                v[k] = mu * v[k] + g
                out[k] = eta * v[k]
                continue
            m[k] = b1 * m[k] + (1 - b1) * g
            if opt.kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * g * g
            elif opt.kind == "yogi":
                v[k] = v[k] - (1 - b2) * g * g * np.sign(v[k] - g * g)
            else:
                v[k] = v[k] + g * g
            lr = eta * np.sqrt(1 - b2**t) / (1 - b1**t) if opt.bias_correction else eta
            out[k] = lr * m[k] / (np.sqrt(v[k]) + tau)
        steps.append(out)
    return steps


def run(opt: ServerOptimizer, seq: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    state = None
    outs = []
    for d in seq:
        out, state = step(opt, state, d)
        outs.append(out)
    return outs


OPTIMIZERS = [
    ServerOptimizer("avgm"),
    ServerOptimizer("avgm", lr=0.5, momentum=0.0),
    ServerOptimizer("adam"),
    ServerOptimizer("adam", lr=0.01, tau=1e-3, bias_correction=True),
    ServerOptimizer("yogi"),
    ServerOptimizer("yogi", beta1=0.5, beta2=0.9, tau=1e-4),
    ServerOptimizer("adagrad"),
    ServerOptimizer("adagrad", lr=0.05, tau=1e-2, beta1=0.0),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: f"{o.kind}-{o.lr}-{o.bias_correction}")
def test_matches_the_reference_over_several_steps(opt: ServerOptimizer) -> None:
    seq = deltas(1)
    for ours, ref in zip(run(opt, seq), reference(opt, seq), strict=True):
        for k in SHAPES:
            assert ours[k].dtype == torch.float32
            np.testing.assert_allclose(ours[k].double().numpy(), ref[k], rtol=2e-5, atol=1e-9)


def test_none_passes_the_merge_through_with_no_state() -> None:
    d = deltas(2, 1)[0]
    out, state = round_step(ServerOptimizer("none"), None, d)
    assert state == {} and all(torch.equal(out[k], d[k]) for k in d)


def test_adaptive_steps_differ_from_the_merge_and_from_each_other() -> None:
    seq = deltas(3)
    finals = {k: run(ServerOptimizer(k), seq)[-1]["w"] for k in ("avgm", "adam", "yogi", "adagrad")}
    names = sorted(finals)
    for i, a in enumerate(names):
        assert not torch.allclose(finals[a], seq[-1]["w"])
        for b in names[i + 1 :]:
            assert not torch.allclose(finals[a], finals[b]), (a, b)


def test_inputs_are_not_modified() -> None:
    seq = deltas(4, 2)
    opt = ServerOptimizer("adam")
    _, s1 = step(opt, None, seq[0])
    before = {k: v.clone() for k, v in s1.items()}
    copy = {k: v.clone() for k, v in seq[1].items()}
    step(opt, s1, seq[1])
    assert all(torch.equal(before[k], s1[k]) for k in s1)
    assert all(torch.equal(copy[k], seq[1][k]) for k in copy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sgd"}, "server-optimizer='sgd' must be one of"),
        ({"kind": "adam", "lr": 0.0}, "server-lr=0.0 must be > 0"),
        ({"kind": "avgm", "momentum": 1.0}, r"server-momentum=1.0 must be in \[0, 1\)"),
        ({"kind": "yogi", "beta2": -0.1}, "server-beta2"),
        ({"kind": "adam", "tau": 0.0}, "server-tau=0.0 must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerOptimizer(**kwargs)  # type: ignore[arg-type]


def test_a_state_from_another_model_is_named() -> None:
    opt = ServerOptimizer("adam")
    _, state = step(opt, None, deltas(5, 1)[0])
    with pytest.raises(IncompatibleDeltasError, match="'c'"):
        step(opt, state, {**deltas(5, 1)[0], "c": torch.zeros(3)})
    with pytest.raises(IncompatibleDeltasError, match="shape"):
        step(opt, state, {"w": torch.zeros(5, 7), "b": torch.zeros(5)})


def test_stored_names_keep_other_state_apart() -> None:
    opt = ServerOptimizer("yogi")
    _, state = step(opt, None, deltas(6, 1)[0])
    stored = {**to_store(opt, state), "w": torch.ones(7, 5)}  # e.g. the downlink residual
    mine, rest = from_store(opt, stored)
    assert set(mine) == set(state) and set(rest) == {"w"}
    assert without_optimizer_state(stored) is not None and set(without_optimizer_state(stored) or {}) == {"w"}
    assert all(k.startswith(STATE_PREFIX + "yogi/") for k in to_store(opt, state))
    # another optimiser's state is not carried over: a fresh start
    assert from_store(ServerOptimizer("adam"), stored)[0] == {}


# -- Flower's strategies ---------------------------------------------------------------------------


def _flower_steps(strategy_name: str, kwargs: dict[str, float], seq: list[dict[str, torch.Tensor]]) -> list:
    """Run Flower's strategy with one client whose result is x_t + Δ_t (so FedAvg's result is that)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy as strategies

    names = sorted(SHAPES)
    x = [np.zeros(SHAPES[n], dtype=np.float32) for n in names]
    strat = getattr(strategies, strategy_name)(initial_parameters=ndarrays_to_parameters(x), **kwargs)
    steps = []
    for r, d in enumerate(seq, start=1):
        result = [xi + d[n].numpy() for xi, n in zip(x, names, strict=True)]
        fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(result), 10, {})
        params, _ = strat.aggregate_fit(r, [(None, fit)], [])
        new = parameters_to_ndarrays(params)
        steps.append({n: new[i] - x[i] for i, n in enumerate(names)})
        x = new
    return steps


@pytest.mark.parametrize(
    ("strategy", "kwargs", "opt"),
    [
        ("FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.9}, ServerOptimizer("avgm", lr=0.7)),
        (
            "FedYogi",
            {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
            ServerOptimizer("yogi", initial_accumulator=0.0),
        ),
        (
            "FedAdagrad",
            {"eta": 0.1, "tau": 1e-9},
            ServerOptimizer("adagrad", beta1=0.0, initial_accumulator=0.0),
        ),
    ],
)
def test_agrees_with_flowers_strategy(strategy: str, kwargs: dict[str, float], opt: ServerOptimizer) -> None:
    seq = deltas(7)
    for ours, theirs in zip(run(opt, seq), _flower_steps(strategy, kwargs, seq), strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(ours[k].numpy(), theirs[k], rtol=1e-4, atol=1e-7)


def test_flowers_fedadam_is_the_paper_with_its_bias_factor_on_eta() -> None:
    """Flower's FedAdam scales η by √(1−β₂^(r+1))/(1−β₁^(r+1)) in round r and starts v at 0: with that
    per-step η our step (no bias correction) gives Flower's weights."""
    seq = deltas(8)
    theirs = _flower_steps("FedAdam", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}, seq)
    state = None
    for r, (d, t) in enumerate(zip(seq, theirs, strict=True), start=1):
        lr = 0.1 * np.sqrt(1 - 0.99 ** (r + 1)) / (1 - 0.9 ** (r + 1))
        out, state = step(ServerOptimizer("adam", lr=float(lr), initial_accumulator=0.0), state, d)
        for k in SHAPES:
            np.testing.assert_allclose(out[k].numpy(), t[k], rtol=1e-4, atol=1e-7)


# -- resume through the store ----------------------------------------------------------------------


def _commit_steps(store: ModelStore, opt: ServerOptimizer, seq: list[dict[str, torch.Tensor]]) -> list[str]:
    ids = []
    for d in seq:
        base = store.get("latest")
        out, persisted = round_step(opt, store.load_state(base), d)
        v = store.commit(
            out, parents=[base.id], method="fedavg", params={}, contributors=[], round=(base.round or 0) + 1,
            metrics={}, privacy=None, state=persisted,
        )  # fmt: skip
        ids.append(v.id)
    return ids


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi", "adagrad"])
def test_a_resumed_run_continues_bit_identically(tmp_path: Path, kind: str) -> None:
    opt = ServerOptimizer(kind)
    seq = deltas(9)
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    with ModelStore.open(tmp_path / "straight") as st:
        st.commit_base(base, name="base")
        _commit_steps(st, opt, seq)
        straight = st.materialize(st.get("latest"))
        straight_state = st.load_state("latest")
    with ModelStore.open(tmp_path / "resumed") as st:
        st.commit_base(base, name="base")
        _commit_steps(st, opt, seq[:3])
    with ModelStore.open(tmp_path / "resumed") as st:  # the server restarts: only the store survives
        _commit_steps(st, opt, seq[3:])
        resumed = st.materialize(st.get("latest"))
        resumed_state = st.load_state("latest")
    assert straight_state is not None and resumed_state is not None
    assert int(resumed_state[f"{STATE_PREFIX}{kind}/step"]) == STEPS
    assert set(straight_state) == set(resumed_state)
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # and the moments matter: restarting them from zero would not give these weights
    with ModelStore.open(tmp_path / "forgetful") as st:
        st.commit_base(base, name="base")
        _commit_steps(st, opt, seq[:3])
        for d in seq[3:]:
            b = st.get("latest")
            out, persisted = round_step(opt, None if d is seq[3] else st.load_state(b), d)
            st.commit(out, parents=[b.id], method="fedavg", params={}, contributors=[], round=None,
                      metrics={}, privacy=None, state=persisted)  # fmt: skip
        forgetful = st.materialize(st.get("latest"))
    assert not all(torch.equal(straight[k], forgetful[k]) for k in straight)


# -- the run config ---------------------------------------------------------------------------------


def test_run_config_keys_build_the_optimizer_and_bad_values_are_named() -> None:
    from fedmerge.flower.config import parse_run_config

    cfg = parse_run_config({"server-optimizer": "yogi", "aggregator": "fedavg"})
    opt = cfg.server_opt.create()
    assert (opt.kind, opt.eta, opt.epsilon, opt.beta1, opt.beta2) == ("yogi", 0.01, 1e-3, 0.9, 0.99)
    cfg = parse_run_config({"server-optimizer": "avgm", "server-lr": 0.5, "server-momentum": 0.0})
    assert cfg.server_opt.create().eta == 0.5 and cfg.server_opt.create().momentum == 0.0
    assert parse_run_config({}).server_opt.create().enabled is False
    with pytest.raises(ConfigError, match="server-optimizer='sgd' must be one of") as info:
        parse_run_config({"server-optimizer": "sgd", "server-beta1": 1.5})
    assert "server-beta1=1.5" in str(info.value)
    with pytest.raises(ConfigError, match="server-lr='fast' must be a number"):
        parse_run_config({"server-lr": "fast"})
