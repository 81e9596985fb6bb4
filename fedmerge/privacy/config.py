"""``DPConfig``: the validated settings of a differentially private federation, and the exact record
of them (with the ε spent) that goes into every version's manifest.

Modes:
  * ``"central"`` (user-level DP-FedAvg): clients clip, the server noises the aggregate with
    std z·C/D; the server is trusted with individual clipped deltas (or runs under SecAgg).
  * ``"local"``: every client clips *and* noises its own delta with std z·C before sending; the
    server adds nothing. Each client's release is a Gaussian mechanism (q = 1) on its own delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge.privacy.accountant import RdpAccountant

MODES = ("central", "local")


@dataclass(frozen=True)
class DPConfig:
    """clip_norm C, noise_multiplier z, target δ, mode, ε budget (None: no limit, ε still recorded)."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    mode: str = "central"
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not (
            isinstance(self.clip_norm, int | float) and self.clip_norm > 0 and math.isfinite(self.clip_norm)
        ):
            raise ConfigError(f"DPConfig.clip_norm must be finite and > 0, got {self.clip_norm!r}")
        z = self.noise_multiplier
        if not (isinstance(z, int | float) and z >= 0 and math.isfinite(z)):
            raise ConfigError(
                f"DPConfig.noise_multiplier must be finite and ≥ 0, got {z!r} (0 means no noise: ε = ∞)"
            )
        if not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise ConfigError(
                f"DPConfig.delta must be in (0, 1), typically below 1/population, got {self.delta!r}"
            )
        if self.mode not in MODES:
            raise ConfigError(f"DPConfig.mode must be one of {MODES}, got {self.mode!r}")
        e = self.max_epsilon
        if e is not None and not (isinstance(e, int | float) and e > 0 and math.isfinite(e)):
            raise ConfigError(f"DPConfig.max_epsilon must be finite and > 0 or None, got {e!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DPConfig:
        """Build from a plain mapping (a run-config section); unknown keys are errors; '-' = '_'."""
        names = {f.name for f in fields(cls)}
        clean = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ConfigError(f"unknown DP settings {unknown}; accepted: {sorted(names)}")
        missing = sorted(n for n in ("clip_norm", "noise_multiplier") if n not in clean)
        if missing:
            raise ConfigError(f"DP settings are missing {missing}")
        return cls(**clean)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def privacy_record(
    config: DPConfig,
    accountant: RdpAccountant,
    *,
    sample_rate: float,
    noise_std: float,
    num_clients: int,
) -> dict[str, Any]:
    """The manifest entry of one DP release: every setting plus ε spent so far (after this release)."""
    eps = accountant.epsilon(config.delta)
    return {
        "mechanism": "gaussian",
        "mode": config.mode,
        "neighbouring": "add-or-remove one client (user-level)",
        "clip_norm": float(config.clip_norm),
        "noise_multiplier": float(config.noise_multiplier),
        "noise_std": float(noise_std),
        "sample_rate": float(sample_rate),
        "num_clients": int(num_clients),
        "delta": float(config.delta),
        "epsilon": eps if math.isfinite(eps) else "inf",
        "max_epsilon": config.max_epsilon,
        "releases": accountant.steps,
        "accountant": accountant.state_dict(),
    }
