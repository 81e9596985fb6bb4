"""Rényi-DP accounting for the sampled Gaussian mechanism (user-level DP-FedAvg rounds and one-shot
continual contributions).

One DP release adds N(0, (z·C)²) noise to a sum of client deltas each clipped to ‖τ_i‖₂ ≤ C, where
every client of a population is included independently with probability q (Poisson sampling).
Its Rényi divergence of order α (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the
Sampled Gaussian Mechanism", add/remove-one neighbouring relation) is

    RDP(α) = log A_α / (α − 1),     A_α = E_{x∼μ0} [ ((1 − q) + q·μ1(x)/μ0(x))^α ],
    μ0 = N(0, z²),  μ1 = N(1, z²),

computed exactly for integer α by the binomial expansion
    A_α = Σ_{k=0}^{α} C(α, k) (1 − q)^{α−k} q^k exp((k² − k) / (2z²))
and for fractional α by the convergent two-sided series of §3.3 of the paper. q = 1 gives the plain
Gaussian mechanism, RDP(α) = α / (2z²); T releases compose additively: RDP_T = Σ_t RDP_t.

(ε, δ) conversion (Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi Differential
Privacy", Thm. 21; as Opacus and Google's dp-accounting):
    ε = min_α  RDP(α) + log((α − 1)/α) − (log δ + log α) / (α − 1).

These are the same formulas as Opacus's ``opacus.accountants.analysis.rdp`` (tested against its
published values) and as the backend of Flower's ``RdpAccountant``. Everything is pure Python
(``math`` plus ``scipy.special.log_ndtr`` for a stable log-erfc).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import special

from fedmerge.errors import ConfigError

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)] + [80.0, 128.0, 256.0, 512.0]
)
"""Rényi orders α searched for the tightest ε: Opacus's defaults (1.1 … 63) plus larger ones for small ε."""

STATE_VERSION = 1


class PrivacyBudgetExceeded(ConfigError):
    """A release would spend more privacy budget (ε at δ) than the configured maximum."""


# ---------------------------------------------------------------------- log-space arithmetic
def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b)."""
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return math.log1p(math.exp(lo - hi)) + hi


def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b) for a ≥ b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    if a < b:
        raise ArithmeticError("log-space subtraction of a larger value")
    try:
        return math.log(math.expm1(a - b)) + b
    except OverflowError:
        return a


def _log_erfc(x: float) -> float:
    """log(erfc(x)), stable for large x."""
    return math.log(2.0) + float(special.log_ndtr(-x * math.sqrt(2.0)))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for k in range(alpha + 1):
        term = (
            math.lgamma(alpha + 1)
            - math.lgamma(k + 1)
            - math.lgamma(alpha - k + 1)
            + k * math.log(q)
            + (alpha - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2)
        )
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """Mironov et al. 2019, §3.3: A_α = A0 + A1, each a series in i = 0, 1, … of signed terms."""
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i = 0
    coef_sign, log_coef = 1.0, 0.0  # sign and log |C(α, i)|, updated by C(α, i+1) = C(α, i)·(α − i)/(i + 1)
    while True:
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef_sign > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if alpha - i < 0:
            coef_sign = -coef_sign
        if alpha - i == 0:
            break  # C(α, k) = 0 for every k > α (integer α; not reached for fractional α)
        log_coef += math.log(abs(alpha - i)) - math.log(i + 1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


# ---------------------------------------------------------------------- public pure functions
def rdp_sampled_gaussian(q: float, noise_multiplier: float, alpha: float) -> float:
    """RDP(α) of one release of the sampled Gaussian mechanism with sample rate q and noise multiplier z."""
    q, z, alpha = _check_q(q), _check_z(noise_multiplier), float(alpha)
    if not alpha > 1 or not math.isfinite(alpha):
        raise ConfigError(f"Rényi order α must be finite and > 1, got {alpha!r}")
    if q == 0:
        return 0.0
    if z == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * z**2)
    if float(alpha).is_integer():
        return _log_a_int(q, z, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, z, alpha) / (alpha - 1)


def compute_rdp(
    q: float, noise_multiplier: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS
) -> list[float]:
    """RDP at each order after ``steps`` identical releases (composition adds RDP)."""
    if int(steps) != steps or steps < 0:
        raise ConfigError(f"steps must be an integer ≥ 0, got {steps!r}")
    return [int(steps) * rdp_sampled_gaussian(q, noise_multiplier, a) for a in orders]


def rdp_to_epsilon(
    rdp: Sequence[float], delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> tuple[float, float]:
    """(ε, best α) at ``delta`` from RDP values at ``orders`` (Balle et al. 2020, Thm. 21)."""
    delta = _check_delta(delta)
    if len(rdp) != len(orders):
        raise ConfigError(f"got {len(rdp)} RDP values for {len(orders)} orders")
    best, best_order = math.inf, math.nan
    for r, a in zip(rdp, orders, strict=True):
        if math.isinf(r):
            continue
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


# ---------------------------------------------------------------------- the accountant
@dataclass(frozen=True)
class Release:
    """``count`` identical sampled-Gaussian releases."""

    noise_multiplier: float
    sample_rate: float
    count: int = 1


class RdpAccountant:
    """Tracks the privacy loss of a sequence of DP releases (one per round or per continual merge).

    >>> acc = RdpAccountant()
    >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=100)
    >>> round(acc.epsilon(1e-5), 2)
    0.96

    ``step(z, q)`` records one round of DP-FedAvg with Poisson client sampling rate q;
    ``one_shot(z)`` records a contribution released once without sampling amplification (q = 1),
    e.g. an expert merged by a continual method: later versions only post-process it, so a
    contributor's loss is that of the release that consumed its delta (see :class:`ContributionLedger`).
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        orders = tuple(float(a) for a in orders)
        if not orders or any(not (a > 1 and math.isfinite(a)) for a in orders):
            raise ConfigError(f"Rényi orders must be a non-empty list of finite values > 1, got {orders!r}")
        self.orders = orders
        self._rdp = [0.0] * len(orders)
        self.history: list[Release] = []

    @property
    def steps(self) -> int:
        return sum(r.count for r in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Compose ``steps`` releases with noise multiplier z and Poisson sample rate q."""
        added = compute_rdp(sample_rate, noise_multiplier, steps, self.orders)
        self._rdp = [a + b for a, b in zip(self._rdp, added, strict=True)]
        self.history.append(Release(float(noise_multiplier), float(sample_rate), int(steps)))

    def one_shot(self, noise_multiplier: float) -> None:
        """A single release without sampling (q = 1): the plain Gaussian mechanism."""
        self.step(noise_multiplier, 1.0, 1)

    def rdp(self) -> list[float]:
        return list(self._rdp)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before any release)."""
        if not self.history:
            _check_delta(delta)
            return 0.0
        return rdp_to_epsilon(self._rdp, delta, self.orders)[0]

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1) -> float:
        """ε that would be spent after ``steps`` more releases (the accountant is not changed)."""
        added = compute_rdp(sample_rate, noise_multiplier, steps, self.orders)
        total = [a + b for a, b in zip(self._rdp, added, strict=True)]
        return rdp_to_epsilon(total, delta, self.orders)[0]

    def check_budget(
        self, noise_multiplier: float, sample_rate: float, delta: float, max_epsilon: float
    ) -> float:
        """Raise :class:`PrivacyBudgetExceeded` if one more release exceeds ``max_epsilon``; else its ε."""
        eps = self.epsilon_if(noise_multiplier, sample_rate, delta)
        if eps > max_epsilon:
            raise PrivacyBudgetExceeded(
                f"one more release (z={noise_multiplier}, q={sample_rate}) would bring ε to {eps:.4g} > "
                f"max_epsilon={max_epsilon} at δ={delta} after {self.steps} releases; stop training, "
                "raise the noise multiplier or lower the sample rate"
            )
        return eps

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable ledger (the RDP curve is recomputed from it on load)."""
        return {
            "version": STATE_VERSION,
            "accounting": "rdp-sampled-gaussian",
            "orders": list(self.orders),
            "history": [
                {"noise_multiplier": r.noise_multiplier, "sample_rate": r.sample_rate, "count": r.count}
                for r in self.history
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RdpAccountant:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"accountant state version {state.get('version')!r} is not supported (expected "
                f"{STATE_VERSION}); it was written by another fedmerge version"
            )
        try:
            acc = cls(orders=state["orders"])
            for r in state["history"]:
                acc.step(r["noise_multiplier"], r["sample_rate"], r["count"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"accountant state is malformed: missing or bad field {exc}") from exc
        return acc


class ContributionLedger:
    """Per-contributor accounting for continual merging, where each client's delta is used once.

    A contributor's delta enters exactly one noised release; every later version is post-processing
    of it plus independent data, so the contributor's ε is the composition of the releases that
    consumed its own deltas (one one-shot release per contribution).
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(orders)
        self._accountants: dict[str, RdpAccountant] = {}

    def contribute(self, client_id: str, noise_multiplier: float) -> None:
        self._accountants.setdefault(str(client_id), RdpAccountant(self.orders)).one_shot(noise_multiplier)

    def epsilon(self, client_id: str, delta: float) -> float:
        acc = self._accountants.get(str(client_id))
        return 0.0 if acc is None else acc.epsilon(delta)

    def epsilons(self, delta: float) -> dict[str, float]:
        return {cid: acc.epsilon(delta) for cid, acc in sorted(self._accountants.items())}


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
    tolerance: float = 1e-3,
) -> float:
    """The smallest z (to ``tolerance``) with ε ≤ ``target_epsilon`` after ``steps`` releases (bisection)."""
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ConfigError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")

    def eps(z: float) -> float:
        return rdp_to_epsilon(compute_rdp(sample_rate, z, steps, orders), delta, orders)[0]

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(f"no noise multiplier ≤ 1e6 reaches ε={target_epsilon} at δ={delta}")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------- validation
def _check_q(q: float) -> float:
    q = float(q)
    if not 0 <= q <= 1:
        raise ConfigError(f"sample_rate must be in [0, 1] (expected clients / population), got {q!r}")
    return q


def _check_z(z: float) -> float:
    z = float(z)
    if not z >= 0 or not math.isfinite(z):
        raise ConfigError(f"noise_multiplier must be finite and ≥ 0, got {z!r}")
    return z


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0 < d < 1:
        raise ConfigError(f"delta must be in (0, 1), typically < 1/population, got {delta!r}")
    return d
