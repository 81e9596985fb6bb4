"""The RDP accountant against published reference numbers, closed forms and numerical integration."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from scipy import integrate

from fedmerge.errors import ConfigError
from fedmerge.privacy import (
    ContributionLedger,
    PrivacyBudgetExceeded,
    RdpAccountant,
    compute_rdp,
    noise_multiplier_for,
    rdp_sampled_gaussian,
    rdp_to_epsilon,
)

OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

# (q, z, steps, δ) → ε, as computed by Opacus 1.6.0:
#   rdp = opacus.accountants.analysis.rdp.compute_rdp(q=q, noise_multiplier=z, steps=T, orders=OPACUS_ORDERS)
#   eps, _ = opacus.accountants.analysis.rdp.get_privacy_spent(orders=OPACUS_ORDERS, rdp=rdp, delta=δ)
OPACUS_REFERENCE = [
    (0.01, 1.1, 100, 1e-5, 0.9560910987474418),
    (256 / 60000, 1.1, 60 * 60000 // 256, 1e-5, 2.5965558689607486),  # DP-SGD MNIST, 60 epochs
    (0.1, 1.0, 50, 1e-5, 5.88097893218889),
    (1.0, 5.0, 1, 1e-6, 0.8999385041732184),
    (0.05, 0.8, 200, 1e-6, 9.905257248336731),
    (0.5, 2.0, 10, 1e-5, 4.366850551130349),
    (0.2, 3.0, 1, 1e-5, 0.42911725508412524),
]


@pytest.mark.parametrize(("q", "z", "steps", "delta", "expected"), OPACUS_REFERENCE)
def test_epsilon_matches_opacus_reference_values(
    q: float, z: float, steps: int, delta: float, expected: float
) -> None:
    eps, _ = rdp_to_epsilon(compute_rdp(q, z, steps, OPACUS_ORDERS), delta, OPACUS_ORDERS)
    assert eps == pytest.approx(expected, rel=1e-9)


def test_matches_opacus_live_when_installed() -> None:
    rdp_mod = pytest.importorskip("opacus.accountants.analysis.rdp")
    for q, z, steps, _, _ in OPACUS_REFERENCE:
        ref = rdp_mod.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=OPACUS_ORDERS)
        ours = compute_rdp(q, z, steps, OPACUS_ORDERS)
        assert ours == pytest.approx(list(ref), rel=1e-8)


def test_matches_flower_accountant_when_its_backend_is_installed() -> None:
    pytest.importorskip("dp_accounting")
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdp

    cfg = PrivacyConfig(
        target_delta=1e-5,
        population_size=1000,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.POISSON,
    )
    flower = FlowerRdp(cfg, orders=tuple(float(a) for a in OPACUS_ORDERS))
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.1, sample_size=10, population_size=1000), 100)
    ours = RdpAccountant(OPACUS_ORDERS)
    ours.step(1.1, 0.01, 100)
    assert ours.epsilon(1e-5) == pytest.approx(flower.get_epsilon(1e-5), rel=1e-6)


def _rdp_by_integration(q: float, z: float, alpha: float) -> float:
    """log E_{x~N(0,z²)}[((1−q) + q·exp((2x−1)/(2z²)))^α] / (α−1), by quadrature: the definition."""

    def integrand(x: float) -> float:
        mu0 = math.exp(-(x**2) / (2 * z**2)) / (z * math.sqrt(2 * math.pi))
        ratio = math.exp((2 * x - 1) / (2 * z**2))
        return mu0 * ((1 - q) + q * ratio) ** alpha

    value, _ = integrate.quad(integrand, -60 * z, 60 * z, limit=400, epsabs=0, epsrel=1e-12)
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 4.7, 8.0])
@pytest.mark.parametrize(("q", "z"), [(0.1, 1.3), (0.02, 0.9), (0.5, 2.0)])
def test_rdp_equals_the_definition_by_numerical_integration(q: float, z: float, alpha: float) -> None:
    assert rdp_sampled_gaussian(q, z, alpha) == pytest.approx(_rdp_by_integration(q, z, alpha), rel=1e-7)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 10.0, 63.0])
def test_without_sampling_it_is_the_gaussian_mechanism(alpha: float) -> None:
    assert rdp_sampled_gaussian(1.0, 2.0, alpha) == pytest.approx(alpha / 8.0, rel=1e-12)
    assert rdp_sampled_gaussian(0.0, 2.0, alpha) == 0.0
    assert rdp_sampled_gaussian(0.3, 0.0, alpha) == math.inf


def test_rounds_compose_additively_and_epsilon_grows() -> None:
    acc = RdpAccountant()
    eps = []
    for _ in range(5):
        acc.step(1.0, 0.1, steps=10)
        eps.append(acc.epsilon(1e-5))
    assert eps == sorted(eps) and len(set(eps)) == 5
    once = RdpAccountant()
    once.step(1.0, 0.1, steps=50)
    assert acc.rdp() == pytest.approx(once.rdp(), rel=1e-12)
    assert acc.steps == 50
    assert RdpAccountant().epsilon(1e-5) == 0.0


def test_more_noise_or_less_sampling_spends_less() -> None:
    def eps(z: float, q: float) -> float:
        return rdp_to_epsilon(compute_rdp(q, z, 100), 1e-5)[0]

    assert eps(2.0, 0.1) < eps(1.0, 0.1)
    assert eps(1.0, 0.01) < eps(1.0, 0.1)


def test_noise_multiplier_for_hits_the_target() -> None:
    z = noise_multiplier_for(2.0, 1e-5, sample_rate=0.05, steps=100)
    eps = rdp_to_epsilon(compute_rdp(0.05, z, 100), 1e-5)[0]
    assert eps <= 2.0
    assert rdp_to_epsilon(compute_rdp(0.05, z - 0.002, 100), 1e-5)[0] > 2.0


def test_state_round_trip_and_bad_state() -> None:
    acc = RdpAccountant()
    acc.step(1.2, 0.05, steps=30)
    acc.one_shot(4.0)
    again = RdpAccountant.from_state_dict(acc.state_dict())
    assert again.epsilon(1e-6) == acc.epsilon(1e-6)
    assert again.history == acc.history
    with pytest.raises(ConfigError, match="version"):
        RdpAccountant.from_state_dict({**acc.state_dict(), "version": 99})
    with pytest.raises(ConfigError, match="malformed"):
        RdpAccountant.from_state_dict({"version": 1, "orders": [2.0]})


def test_budget_is_enforced_before_the_release() -> None:
    acc = RdpAccountant()
    acc.step(1.0, 0.1, steps=40)
    before = acc.epsilon(1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match=r"max_epsilon=1\.0"):
        acc.check_budget(1.0, 0.1, 1e-5, max_epsilon=1.0)
    assert acc.epsilon(1e-5) == before
    assert acc.check_budget(1.0, 0.1, 1e-5, max_epsilon=100.0) > before


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rdp_sampled_gaussian(1.5, 1.0, 2.0), "sample_rate"),
        (lambda: rdp_sampled_gaussian(0.1, -1.0, 2.0), "noise_multiplier"),
        (lambda: rdp_sampled_gaussian(0.1, 1.0, 1.0), "order"),
        (lambda: rdp_to_epsilon([1.0], 0.0, [2.0]), "delta"),
        (lambda: compute_rdp(0.1, 1.0, -3), "steps"),
        (lambda: RdpAccountant(orders=[0.5]), "orders"),
    ],
)
def test_bad_parameters_are_named(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_one_shot_contributions_are_charged_per_contributor() -> None:
    ledger = ContributionLedger()
    ledger.contribute("hospital-a", 3.0)
    ledger.contribute("hospital-b", 3.0)
    ledger.contribute("hospital-b", 3.0)
    single = RdpAccountant()
    single.one_shot(3.0)
    assert ledger.epsilon("hospital-a", 1e-5) == pytest.approx(single.epsilon(1e-5))
    assert ledger.epsilon("hospital-b", 1e-5) > ledger.epsilon("hospital-a", 1e-5)
    assert ledger.epsilon("never-seen", 1e-5) == 0.0
    assert set(ledger.epsilons(1e-5)) == {"hospital-a", "hospital-b"}
