"""Calibrated Gaussian noise for DP aggregates (central) and for client deltas (local DP).

Central, user-level DP-FedAvg (McMahan et al. 2018): with every delta clipped to ‖τ_i‖₂ ≤ C, one
client changes the *sum* Σ_i τ_i by at most C (add/remove-one), so

    sum:  Σ_i τ_i + N(0, (z·C)² I)          mean over a fixed denominator D:  std = z·C / D

where z is the noise multiplier that the accountant charges for. D must not depend on the data
(use the expected number of clients, q·population, or the fixed cohort size, and unit weights):
dividing by the realised, data-weighted Σ w_i changes the sensitivity and the guarantee.

Local DP (the client noises its own clipped delta): τ̃_i = τ̄_i + N(0, (z·C)² I); each release is
then a plain Gaussian mechanism (q = 1) for that client, whatever the server does.

Noise is drawn in fp32 from an explicit ``torch.Generator``, tensor by tensor in sorted-name order,
so a seed reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedmerge.errors import ConfigError


def noise_std(noise_multiplier: float, clip_norm: float, denominator: float = 1.0) -> float:
    """σ = z · C / D: the per-coordinate std of the noise on a sum (D = 1) or on a mean over D clients."""
    z, c, d = float(noise_multiplier), float(clip_norm), float(denominator)
    if not (z >= 0 and math.isfinite(z)):
        raise ConfigError(f"noise_multiplier must be finite and ≥ 0, got {noise_multiplier!r}")
    if not (c > 0 and math.isfinite(c)):
        raise ConfigError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
    if not (d > 0 and math.isfinite(d)):
        raise ConfigError(
            f"denominator must be finite and > 0 (the fixed number of clients the sum is divided by), got "
            f"{denominator!r}"
        )
    return z * c / d


def add_gaussian_noise(
    aggregate: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """aggregate + N(0, std² I), a new fp32 state dict (the input is not modified)."""
    s = float(std)
    if not (s >= 0 and math.isfinite(s)):
        raise ConfigError(f"noise std must be finite and ≥ 0, got {std!r}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(aggregate):
        x = aggregate[name]
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=generator.device)
        out[name] = x.to(torch.float32) + s * noise.to(x.device)
    return out
