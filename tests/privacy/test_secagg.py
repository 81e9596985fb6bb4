"""SecAgg+ rounds (fedmerge.privacy.secagg): real masked sums against fedmerge's plain aggregators.

Every run executes Flower's real SecAgg+ protocol (``SecAggPlusWorkflow`` + ``secaggplus_mod``: key
agreement, Shamir shares, pairwise and private masks, quantization). The fast tests carry the
messages on ``InProcessGrid`` (protobuf round trips, one thread); the slow test uses Flower's
simulation engine (Ray). The reference is recomputed here: each client's task vector is retrained in
this process from the committed parent version (training is seeded by (seed, round, client) and runs
on one thread, so it reproduces the client's delta), then merged by fedmerge's aggregator.

Bound checked (derived in the module docstring), m clients, Δ = 2c/Q, W the weight scale:
fedavg/dare |secagg − plain| < m·Δ·W/Σn; TIES < λ·m·Δ·W/D_j with D_j the agreeing divisor. Both sides
also round to fp32 (the reference accumulates in fp32): we allow 2⁻²⁰·max|plain| on top.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from fedmerge.aggregators import merge
from fedmerge.aggregators.sparsify import trim
from fedmerge.errors import ConfigError
from fedmerge.flower.server.federation import RoundAborted
from fedmerge.flower.server.secagg import SecAggRound
from fedmerge.privacy.secagg import SecAggConfig, SecAggRangeError, check_range, submission_terms
from fedmerge.store import ModelStore
from fedmerge.tasks.local_round import local_round
from fedmerge.tasks.partitions import partition_for
from fedmerge.tasks.training import torch_threads
from fedmerge_simulations.secagg import run_secagg
from fedmerge_simulations.tasks import get_task

CLIENTS = 4
BASE: dict[str, Any] = {"num-clients": CLIENTS, "num-rounds": 1, "seed": 3, "server-eval": False}


@pytest.fixture(autouse=True)
def flower_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    yield


def _run(tmp_path: Path, engine: str = "inprocess", **overrides: Any) -> tuple[Path, list[SecAggRound]]:
    store = tmp_path / "store"
    config = {**BASE, "store": str(store), **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return store, run_secagg(config, engine=engine)  # type: ignore[arg-type]


def _client_deltas(
    store: Path, version_id: str, cfg: SecAggConfig
) -> tuple[list[dict[str, torch.Tensor]], list[int], dict[str, torch.Tensor], Any]:
    """Each client's task vector for ``version_id``'s round, retrained from the parent version."""
    with ModelStore.open(store) as st:
        version = st.get(version_id)
        base = st.materialize(version.parents[0])
        delta = st.load_delta(version)
    task = get_task(cfg.task)
    parts = partition_for(cfg.task, cfg.num_clients, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)
    deltas = []
    with torch_threads(1):
        for data in parts:
            update = local_round(
                task, base, data, seed=cfg.seed, round_=int(version.round or 0), epochs=cfg.local_epochs,
                lr=cfg.lr, batch_size=cfg.batch_size,
            )  # fmt: skip
            deltas.append(update.delta)
    return deltas, [d.num_examples for d in parts], delta, version


def _slack(reference: dict[str, torch.Tensor]) -> float:
    return 2.0**-20 * max(float(t.abs().max()) for t in reference.values())


def _total(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).sum(dim=0)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("quantization_range", [2**22, 2**16])
def test_secagg_fedavg_equals_weighted_mean_within_bound(tmp_path: Path, quantization_range: int) -> None:
    store, reports = _run(tmp_path, quantization_range=quantization_range)
    cfg = SecAggConfig.from_mapping({**BASE, "quantization-range": quantization_range})
    (report,) = reports
    deltas, ns, secure, _ = _client_deltas(store, report.version_id, cfg)
    plain = merge("fedavg", deltas, ns)
    bound = CLIENTS * cfg.step * cfg.weight_scale / sum(ns)
    error = _max_diff(secure, plain)
    assert report.total_examples == sum(ns)  # the server learned Σn exactly, from the masked weight
    assert report.error_bound == pytest.approx(bound)
    assert error <= bound + _slack(plain)
    # an independent float64 transcription of Σ n_i τ_i / Σ n_i agrees too
    exact = {k: _total([n * d[k].double() for n, d in zip(ns, deltas, strict=True)]) / sum(ns) for k in plain}
    assert _max_diff(secure, exact) <= bound + _slack(plain)
    if quantization_range == 2**16:  # coarse grid: the error is real and exceeds the fine grid's bound
        fine = CLIENTS * (2 * cfg.clipping_range / 2**22) * cfg.weight_scale / sum(ns)
        assert error > fine


@pytest.mark.parametrize("sign_election", ["frequency", "total"])
def test_ties_as_sums_equals_fedmerge_ties_within_bound(tmp_path: Path, sign_election: str) -> None:
    settings: dict[str, Any] = {
        "mode": "ties",
        "ties-density": 0.3,
        "ties-sign-election": sign_election,
        "ties-scaling": 0.8,
    }
    store, (report,) = _run(tmp_path, **settings)
    cfg = SecAggConfig.from_mapping({**BASE, **settings})
    deltas, ns, secure, version = _client_deltas(store, report.version_id, cfg)
    plain = merge(
        "ties", deltas, ns, density=0.3, sign_election=sign_election, divisor="weight", scaling=0.8,
        seed=cfg.seed, round=report.round,
    )  # fmt: skip
    m_step_w = CLIENTS * cfg.step * cfg.weight_scale
    ambiguous = 0
    for name in plain:
        trimmed = [cast(torch.Tensor, trim(d[name].float(), 0.3)).reshape(-1).double() for d in deltas]
        pairs = list(zip(ns, trimmed, strict=True))
        vote = _total([t if sign_election == "total" else torch.sign(t) for t in trimmed])
        P = _total([n * t.clamp(min=0) for n, t in pairs])
        N = _total([n * t.clamp(max=0) for n, t in pairs])
        Pc = _total([n * (t > 0).double() for n, t in pairs])
        Nc = _total([n * (t < 0).double() for n, t in pairs])
        positive = vote >= 0
        divisor = torch.where(positive, Pc, Nc)
        bound = torch.where(divisor > 0, 0.8 * m_step_w / divisor.clamp(min=1), torch.zeros_like(divisor))
        got = secure[name].reshape(-1).double()
        want = plain[name].reshape(-1).double()
        tol = bound + _slack(plain)
        # near-ties of the total vote (|S| < m·Δ) may elect the other sign; frequency votes are exact
        near = vote.abs() < CLIENTS * cfg.step if sign_election == "total" else torch.zeros_like(positive)
        assert bool(((got - want).abs() <= tol)[~near].all()), name
        if bool(near.any()):
            other = 0.8 * torch.where(positive, N / Nc.clamp(min=1), P / Pc.clamp(min=1))
            other_bound = m_step_w * 0.8 / torch.where(positive, Nc, Pc).clamp(min=1)
            either = ((got - want).abs() <= tol) | ((got - other).abs() <= other_bound + _slack(plain))
            assert bool(either[near].all()), name
            ambiguous += int(near.sum())
    if sign_election == "frequency":
        assert report.ambiguous_coordinates == 0 and ambiguous == 0
    record = version.metadata["secure_aggregation"]
    assert record["submission"] == "ties-five-sums" and version.method == "ties"
    assert version.params["sign_election"] == sign_election and version.params["density"] == 0.3


def test_dare_masks_go_through_the_same_sum_path(tmp_path: Path) -> None:
    store, (report,) = _run(tmp_path, mode="dare", dare_density=0.6)
    cfg = SecAggConfig.from_mapping({**BASE, "mode": "dare", "dare-density": 0.6})
    deltas, ns, secure, version = _client_deltas(store, report.version_id, cfg)
    plain = merge("dare_linear", deltas, ns, density=0.6, normalize=True, seed=cfg.seed, round=report.round)
    bound = CLIENTS * cfg.step * cfg.weight_scale / sum(ns)
    assert _max_diff(secure, plain) <= bound + _slack(plain)
    # the masks were applied: FedAvg of the undropped deltas is far from the DARE result
    assert _max_diff(merge("fedavg", deltas, ns), plain) > 100 * bound
    assert version.method == "dare_linear" and version.params["mask_rng"] == "splitmix64"


def test_versions_record_secure_aggregation_and_plain_runs_do_not(tmp_path: Path) -> None:
    store, reports = _run(tmp_path / "secure", num_rounds=2, num_shares=3, reconstruction_threshold=2)
    assert [r.round for r in reports] == [1, 2]
    with ModelStore.open(store) as st:
        first, second = st.get(reports[0].version_id), st.get("latest")
        assert second.id == reports[1].version_id and second.parents == (first.id,)
        assert first.parents == ("v000001",) and st.get("v000001").kind == "full"
        record = second.metadata["secure_aggregation"]
        assert record["num_shares"] == 3 and record["reconstruction_threshold"] == 2
        assert record["clipping_range"] == 1.0 and record["quantization_range"] == 2**22
        assert record["modulus_range"] == 2**32 and record["weight_scale"] == 1024
        assert record["clients_summed"] == CLIENTS and record["dropped"] == []
        assert record["total_examples"] == reports[1].total_examples
        assert record["error_bound"] == pytest.approx(reports[1].error_bound)
        # per-client weights stay hidden: the server records who took part, not how much data each had
        assert [c.num_examples for c in second.contributors] == [0] * CLIENTS
        assert second.method == "fedavg" and second.round == 2
        assert second.metrics["uplink-bytes"] == reports[1].uplink_bytes > 0
        assert st.verify().ok
    plain_store, plain_reports = _run(tmp_path / "plain", secure=False)
    with ModelStore.open(plain_store) as st:
        version = st.get(plain_reports[0].version_id)
        assert version.metadata["secure_aggregation"] is None
        assert sorted(c.num_examples for c in version.contributors) == sorted(
            d.num_examples for d in partition_for("digits", CLIENTS, "dirichlet", 0.5, 3)
        )
    # the masked uplink (int64 masked vectors plus key exchange) is larger than the dense fp32 one
    assert reports[0].uplink_bytes > plain_reports[0].uplink_bytes


def test_out_of_range_submissions_are_refused_and_the_round_aborts(tmp_path: Path) -> None:
    deltas = {"w": torch.tensor([0.5, -0.25])}
    cfg = SecAggConfig(clipping_range=0.125)
    terms = submission_terms(deltas, ["w"], 512, cfg, round_=1, client=0)
    assert np.allclose(terms[0], [0.25, -0.125]) and terms[-1][0] == 0.5
    with pytest.raises(SecAggRangeError, match="clipping-range"):
        check_range(terms, cfg.clipping_range)
    with pytest.raises(RoundAborted, match="committed"):
        _run(tmp_path, clipping_range=2.0**-8)  # every client refuses: SecAgg+ halts, nothing is committed
    with ModelStore.open(tmp_path / "store") as st:
        assert [v.id for v in st.list()] == ["v000001"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("clipping-range", 0.75),
        ("weight-scale", 1000),
        ("mode", "median"),
        ("ties-divisor", "max"),
        ("min-summed", 9),
    ],
)
def test_invalid_settings_are_rejected(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key.split("-")[-1]):
        SecAggConfig.from_mapping({key: value})


@pytest.mark.slow
def test_simulation_engine_gives_the_same_secure_aggregate(tmp_path: Path) -> None:
    """Flower's simulation engine (Ray) runs the same protocol: its aggregate is the in-process one."""
    store, (report,) = _run(tmp_path / "ray", engine="simulation", num_clients=3)
    local_store, (local,) = _run(tmp_path / "local", num_clients=3)
    with ModelStore.open(store) as st, ModelStore.open(local_store) as lt:
        ray_delta, local_delta = st.load_delta(report.version_id), lt.load_delta(local.version_id)
        assert st.get(report.version_id).metadata["secure_aggregation"]["clients_summed"] == 3
    assert _max_diff(ray_delta, local_delta) <= 2 * report.error_bound
    assert report.uplink_bytes == pytest.approx(local.uplink_bytes, rel=0.01)
