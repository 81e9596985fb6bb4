"""Noise scale, statistically: the measured std of the added noise matches its calibrated value."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from scipy import stats

from fedmerge.aggregators import merge
from fedmerge.errors import ConfigError
from fedmerge.privacy import (
    DPConfig,
    PrivacyBudgetExceeded,
    RdpAccountant,
    add_gaussian_noise,
    noise_std,
    privatize_aggregate,
    privatize_client_delta,
)

N_COORDS = 1_000_000

MakeDelta = Callable[..., dict[str, torch.Tensor]]


def _noise_of(std: float, seed: int) -> torch.Tensor:
    zero = {"a": torch.zeros(N_COORDS // 2), "b": torch.zeros(N_COORDS // 2)}
    out = add_gaussian_noise(zero, std, torch.Generator().manual_seed(seed))
    return torch.cat([out["a"], out["b"]]).double()


@pytest.mark.parametrize("std", [0.01, 0.7, 3.0])
def test_measured_std_is_within_one_percent_of_the_calibrated_value(std: float) -> None:
    noise = _noise_of(std, seed=11)
    assert float(noise.std()) == pytest.approx(std, rel=0.01)  # sampling error of the std ≈ 0.07 %
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(N_COORDS)


def test_noise_is_gaussian_and_independent_across_coordinates() -> None:
    noise = _noise_of(2.0, seed=12)
    sample = (noise[:20_000] / 2.0).numpy()
    assert stats.kstest(sample, "norm").pvalue > 1e-3
    corr = float(torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(N_COORDS)


def test_noise_is_reproducible_from_the_generator_and_leaves_the_input_alone() -> None:
    agg = {"w": torch.ones(100)}
    a = add_gaussian_noise(agg, 1.0, torch.Generator().manual_seed(5))
    b = add_gaussian_noise(agg, 1.0, torch.Generator().manual_seed(5))
    c = add_gaussian_noise(agg, 1.0, torch.Generator().manual_seed(6))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    assert torch.equal(agg["w"], torch.ones(100))


def test_calibration_formula_and_its_validation() -> None:
    assert noise_std(1.1, 2.0, 10) == pytest.approx(0.22)
    for args, match in [
        ((-1, 1, 1), "noise_multiplier"),
        ((1, 0, 1), "clip_norm"),
        ((1, 1, 0), "denominator"),
    ]:
        with pytest.raises(ConfigError, match=match):
            noise_std(*args)


def test_dp_fedavg_round_noise_on_the_mean_is_z_c_over_d(make_delta: MakeDelta) -> None:
    """Clients clip, FedAvg with unit weights over D clients, server noise: std(noised − clean) = z·C/D."""
    cfg = DPConfig(clip_norm=1.5, noise_multiplier=1.2, delta=1e-5)
    clients = [make_delta(i, scale=0.5) for i in range(10)]
    clipped = [
        privatize_client_delta(d, cfg, torch.Generator().manual_seed(i))[0] for i, d in enumerate(clients)
    ]
    clean = merge("fedavg", clipped)
    big = {
        k: v.reshape(-1).repeat(200) for k, v in clean.items()
    }  # enough coordinates to measure the std to < 1 %
    acc = RdpAccountant()
    noised, record = privatize_aggregate(
        big,
        cfg,
        acc,
        denominator=10,
        sample_rate=0.1,
        num_clients=10,
        generator=torch.Generator().manual_seed(0),
    )
    diff = torch.cat([(noised[k] - big[k]).reshape(-1) for k in big]).double()
    assert float(diff.std()) == pytest.approx(1.2 * 1.5 / 10, rel=0.05)
    assert record["noise_std"] == pytest.approx(0.18)
    assert record["epsilon"] == pytest.approx(acc.epsilon(1e-5)) and record["epsilon"] > 0
    assert (record["clip_norm"], record["noise_multiplier"], record["delta"]) == (1.5, 1.2, 1e-5)
    assert record["releases"] == 1 and record["mode"] == "central"


def test_local_dp_noises_each_client_and_the_server_adds_nothing() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=0.8, mode="local")
    d = {"w": torch.zeros(200_000)}
    noised, norm = privatize_client_delta(d, cfg, torch.Generator().manual_seed(3))
    assert norm == 0.0
    assert float(noised["w"].std()) == pytest.approx(0.8, rel=0.01)
    acc = RdpAccountant()
    out, record = privatize_aggregate(
        noised, cfg, acc, denominator=5, sample_rate=0.1, num_clients=5, generator=torch.Generator()
    )
    assert torch.equal(out["w"], noised["w"])
    assert record["sample_rate"] == 1.0  # no amplification is claimed in local mode


def test_a_release_over_budget_is_refused_before_anything_changes() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=0.5, max_epsilon=1.0)
    acc = RdpAccountant()
    with pytest.raises(PrivacyBudgetExceeded, match="max_epsilon"):
        privatize_aggregate(
            {"w": torch.zeros(3)},
            cfg,
            acc,
            denominator=1,
            sample_rate=1.0,
            num_clients=1,
            generator=torch.Generator(),
        )
    assert acc.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": 1.0, "noise_multiplier": -0.1}, "noise_multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "mode": "global"}, "mode"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "max_epsilon": -2.0}, "max_epsilon"),
    ],
)
def test_dp_config_validation_names_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def test_dp_config_from_mapping() -> None:
    cfg = DPConfig.from_mapping({"clip-norm": 2.0, "noise-multiplier": 1.0, "delta": 1e-6})
    assert cfg == DPConfig(clip_norm=2.0, noise_multiplier=1.0, delta=1e-6)
    assert cfg.as_dict()["clip_norm"] == 2.0
    with pytest.raises(ConfigError, match="clip_nrom"):
        DPConfig.from_mapping({"clip_nrom": 2.0, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="missing"):
        DPConfig.from_mapping({"clip_norm": 2.0})
