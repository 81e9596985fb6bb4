"""DP and anomaly screening wired into the Flower rounds: config validation, the client clip before error
feedback, the server's noise scale and fixed denominator, screening, and real simulated rounds."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedmerge.codec import CodecConfig, PackageMeta, decode_package
from fedmerge.errors import ConfigError
from fedmerge.flower.client.reply import encode_reply, keep_dp_settings
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.records import CONFIG_RECORD
from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.safeguards import (
    AnomalousSubmission,
    Reference,
    anomaly_metadata,
    privatize_round,
    screen_delta,
)
from fedmerge.flower.transport import record_to_package
from fedmerge.privacy import RdpAccountant, delta_norm
from fedmerge.store import ModelStore

DP = {"dp-clip-norm": 0.5, "dp-noise-multiplier": 1.0, "aggregator": "fedavg", "dp-noise-seed": 7}


# ---------------------------------------------------------------- run config


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0},
            r"aggregator='ties' is not compatible with central DP",
        ),
        ({**DP, "aggregator": "krum"}, r"aggregator='krum' is not compatible"),
        ({**DP, "dp-clip-norm": -1.0}, r"dp-clip-norm=-1.0 must be > 0"),
        ({**DP, "dp-noise-multiplier": -0.5}, r"dp-noise-multiplier must be finite and ≥ 0, got -0.5"),
        ({**DP, "dp-delta": 1.5}, r"dp-delta must be in \(0, 1\)"),
        ({**DP, "dp-mode": "global"}, r"dp-mode must be one of .*'global'"),
        ({**DP, "reject-min-cosine": 2.0}, r"reject-min-cosine=2.0 must be in \[-1, 1\]"),
        ({"reject-anomalies": -1.0}, r"reject-anomalies=-1.0 must be ≥ 0"),
    ],
)
def test_bad_dp_config_is_a_config_error_naming_the_key(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(raw)


def test_dp_config_accepts_compatible_or_explicitly_allowed_aggregators() -> None:
    assert parse_run_config({}).dp.config() is None
    assert parse_run_config(DP).dp.config() is not None
    assert parse_run_config({**DP, "aggregator": "norm_bounded"}).dp.config() is not None
    assert parse_run_config({**DP, "aggregator": "ties", "dp-mode": "local"}).dp.config() is not None
    assert (
        parse_run_config({**DP, "aggregator": "ties", "dp-allow-any-aggregator": True}).dp.config()
        is not None
    )
    with pytest.raises(ConfigError, match="not compatible"):
        parse_run_config({**DP, "aggregator": "norm_bounded", "aggregator.inner": "task_arithmetic"})


# ---------------------------------------------------------------- client side


def _context(dp: dict[str, Any] | None) -> Context:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    conf = ConfigRecord({"round": 1, **(dp or {})})
    keep_dp_settings(RecordDict({CONFIG_RECORD: conf}), ctx)
    return ctx


def _meta(round_: int = 1) -> PackageMeta:
    return PackageMeta(
        client_id="c0", round=round_, base_version_id="v1", base_version_hash="h", num_examples=10
    )


def test_client_clips_before_error_feedback_so_the_residual_is_of_the_clipped_delta() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(40, 50, generator=g), "b": torch.randn(50, generator=g)}
    norm = delta_norm(delta)
    clip = norm / 4
    ctx = _context({"dp-clip-norm": clip, "dp-noise-multiplier": 1.0, "dp-mode": "central"})
    codec = CodecConfig(sparsify="topk", density=0.1, values="fp32", error_feedback=True)
    content, result = encode_reply(delta, codec, _meta(), ctx, {})
    metrics = content.metric_records["metrics"]
    assert metrics["dp-norm"] == pytest.approx(norm)
    assert metrics["dp-clip-factor"] == pytest.approx(0.25)
    sent = decode_package(record_to_package(content)).tensors
    # sent + residual = the clipped delta (norm C), not the raw one (norm 4C)
    total = {k: sent[k].to_dense() + result.residual[k] for k in delta}
    assert delta_norm(total) == pytest.approx(clip, rel=1e-5)
    assert torch.allclose(total["w"], delta["w"] * 0.25, atol=1e-5)


def test_client_local_mode_adds_noise_of_std_z_c_and_dp_off_leaves_the_delta_alone() -> None:
    delta = {"w": torch.zeros(200_000)}
    codec = CodecConfig(sparsify="none", density=1.0, values="fp32", error_feedback=False)
    ctx = _context({"dp-clip-norm": 2.0, "dp-noise-multiplier": 0.75, "dp-mode": "local", "dp-noise-seed": 3})
    content, _ = encode_reply(delta, codec, _meta(), ctx, {})
    noised = decode_package(record_to_package(content)).tensors["w"]
    assert isinstance(noised, torch.Tensor)
    assert float(noised.std()) == pytest.approx(0.75 * 2.0, rel=0.01)
    # a later message without dp-* keys turns DP off on this node
    keep_dp_settings(RecordDict({CONFIG_RECORD: ConfigRecord({"round": 2})}), ctx)
    plain, _ = encode_reply({"w": torch.ones(10)}, codec, _meta(2), ctx, {})
    assert "dp-norm" not in plain.metric_records["metrics"]
    assert torch.equal(decode_package(record_to_package(plain)).tensors["w"], torch.ones(10))  # type: ignore[arg-type]


# ---------------------------------------------------------------- server side


def test_central_release_rescales_to_the_cohort_and_adds_noise_of_std_z_c_over_d() -> None:
    cfg = parse_run_config({**DP, "dp-clip-norm": 1.5, "dp-noise-multiplier": 1.2})
    mean = {"w": torch.full((500_000,), 0.3)}
    acc = RdpAccountant()
    out, record = privatize_round(mean, cfg, acc, cohort=10, connected=40, accepted=8, round_=1, attempt=0)
    assert record is not None
    noise = out["w"] - 0.3 * 8 / 10  # fixed denominator: Σ τ̄ / D with D = 10 sampled, 8 accepted
    assert float(noise.mean()) == pytest.approx(0.0, abs=5 * 0.18 / math.sqrt(5e5))
    assert float(noise.std()) == pytest.approx(1.2 * 1.5 / 10, rel=0.01)
    assert record["noise_std"] == pytest.approx(0.18)
    assert record["sample_rate"] == pytest.approx(0.25)
    assert record["calibrated"] is True and record["denominator"] == 10 and record["releases"] == 1
    expected = RdpAccountant()
    expected.step(1.2, 0.25)
    assert record["epsilon"] == pytest.approx(expected.epsilon(1e-5))


def test_dp_off_release_is_the_identity() -> None:
    merged = {"w": torch.ones(3)}
    out, record = privatize_round(
        merged, parse_run_config({}), RdpAccountant(), cohort=3, connected=3, accepted=3, round_=1, attempt=0
    )
    assert record is None and out is merged


def test_screening_rejects_by_cosine_and_norm_and_clips_under_central_dp() -> None:
    prev = {"w": torch.ones(100)}
    ref = Reference("v000002", prev, norms=(1.0, 1.1, 0.9, 1.05))
    cfg = parse_run_config({"reject-anomalies": 5.0, "reject-min-cosine": 0.0})
    scores: dict[str, dict[str, Any]] = {}
    ok = {"w": torch.ones(100) * 0.1}
    folded, weight = screen_delta(ok, 7.0, "good", cfg, ref, scores)
    assert folded is ok and weight == 7.0 and scores["good"]["cosine_prev"] == pytest.approx(1.0)
    with pytest.raises(AnomalousSubmission, match=r"'flip'.*cosine -1.000 to the previous aggregate v000002"):
        screen_delta({"w": -ok["w"]}, 7.0, "flip", cfg, ref, scores)
    with pytest.raises(AnomalousSubmission, match=r"'big'.*norm 100 has robust z-score"):
        screen_delta({"w": torch.ones(100) * 10}, 7.0, "big", cfg, ref, scores)
    assert scores["flip"]["rejected"] and scores["big"]["rejected"] and not scores["good"]["rejected"]
    meta = anomaly_metadata(scores, ref, cfg)["anomaly"]
    assert meta["reference_version"] == "v000002" and meta["withheld"] is False
    assert meta["clients"]["good"]["norm"] == pytest.approx(1.0) and "norm_score" in meta["clients"]["good"]
    # central DP: clipped to C with unit weight; the values are withheld from the manifest
    dp_cfg = parse_run_config({**DP, "dp-clip-norm": 0.25})
    dp_scores: dict[str, dict[str, Any]] = {}
    clipped, w = screen_delta(ok, 7.0, "good", dp_cfg, ref, dp_scores)
    assert w == 1.0 and delta_norm(clipped) == pytest.approx(0.25)
    assert anomaly_metadata(dp_scores, ref, dp_cfg)["anomaly"]["clients"] == {"good": {"rejected": False}}


# ---------------------------------------------------------------- real simulated rounds


@pytest.fixture
def flower_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    yield


def _simulate(store: Path, num_nodes: int, **overrides: Any) -> list[RoundReport]:
    """fedmerge's apps on Flower's simulation runtime, ``overrides`` in the run config."""
    from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app

    reports: list[RoundReport] = []
    config = {"store": str(store), "local-epochs": 1, "lr": 0.1, "min-clients": num_nodes, "min-valid": 2}
    config.update(overrides)
    run_simulation_app(
        ServerAppFactory("fedmerge_server.app:make_server_app"),
        "fedmerge_clients.app:app",
        num_supernodes=num_nodes,
        run_config=config,
        on_report=reports.append,
    )
    return reports


@pytest.mark.integration
def test_dp_rounds_record_privacy_in_every_version_and_resume_the_accountant(
    tmp_path: Path, flower_home: None
) -> None:
    store = tmp_path / "store"
    dp = {**DP, "dp-clip-norm": 0.05, "dp-noise-multiplier": 1.1, "dp-delta": 1e-4}
    first = _simulate(store, 3, **dp, **{"num-rounds": 2})
    assert [r.version_id for r in first] == ["v000002", "v000003"]
    second = _simulate(store, 3, **dp, **{"num-rounds": 1})
    assert [r.version_id for r in second] == ["v000004"]
    with ModelStore.open(store) as st:
        versions = [st.get(v) for v in ("v000002", "v000003", "v000004")]
        records = [v.privacy for v in versions]
        assert all(r is not None for r in records)
        eps = [float(r["epsilon"]) for r in records if r is not None]
        assert eps[0] < eps[1] < eps[2]  # ε grows, across the resumed run too
        for i, r in enumerate(records, start=1):
            assert r is not None
            assert r["releases"] == i and r["delta"] == 1e-4
            assert r["clip_norm"] == 0.05 and r["noise_multiplier"] == 1.1
            assert r["noise_std"] == pytest.approx(1.1 * 0.05 / 3) and r["sample_rate"] == 1.0
        ref = RdpAccountant()
        ref.step(1.1, 1.0, steps=3)
        assert eps[2] == pytest.approx(ref.epsilon(1e-4))
        for v in versions:
            # every client's raw update was above C = 0.05 and was clipped before encoding
            assert v.metrics["clients-dp-norm"] > 0.05
            assert v.metrics["clients-dp-clip-factor"] < 1.0
            assert v.metadata["anomaly"]["withheld"] is True
            assert len(v.metadata["anomaly"]["clients"]) == 3
        # the committed update is (mean of clipped deltas, norm ≤ C = 0.05) + N(0, σ²): with P ≈ 17k
        # coordinates the noise dominates, so the entries' RMS is σ = z·C/D within 5 %
        for v in versions:
            flat = torch.cat([t.reshape(-1).double() for t in st.load_delta(v).values()])
            assert float(flat.pow(2).mean().sqrt()) == pytest.approx(1.1 * 0.05 / 3, rel=0.05)
