"""The two ends of a DP release, for the round engine to call.

Client:  ``privatize_client_delta``  clip to C (always, before any codec step); in local mode also
         add N(0, (z·C)²) from the client's own generator.
Server:  ``privatize_aggregate``     check the ε budget, add N(0, (z·C/D)²) to the aggregate (central
         mode; nothing in local mode), charge the accountant, return the manifest record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedmerge.delta.clipping import DeltaTensor, clip_delta
from fedmerge.privacy.accountant import RdpAccountant
from fedmerge.privacy.config import DPConfig, privacy_record
from fedmerge.privacy.noise import add_gaussian_noise, noise_std


def privatize_client_delta(
    delta: Mapping[str, torch.Tensor], config: DPConfig, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], float]:
    """(clipped — and in local mode noised — dense delta, original norm)."""
    clipped, norm = clip_delta(delta, config.clip_norm)
    dense = {k: _dense(v) for k, v in clipped.items()}
    if config.mode == "local":
        dense = add_gaussian_noise(dense, noise_std(config.noise_multiplier, config.clip_norm), generator)
    return dense, norm


def privatize_aggregate(
    aggregate: Mapping[str, torch.Tensor],
    config: DPConfig,
    accountant: RdpAccountant,
    *,
    denominator: float,
    sample_rate: float,
    num_clients: int,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Noise a mean over the fixed ``denominator`` (1 for a sum) and charge one release.

    Raises :class:`~fedmerge.privacy.accountant.PrivacyBudgetExceeded` *before* touching anything
    if the release would exceed ``config.max_epsilon``. In local mode the clients already noised
    their deltas: the aggregate is returned unchanged and each client's release is charged as one
    Gaussian mechanism without amplification (q = 1).
    """
    q = 1.0 if config.mode == "local" else sample_rate
    if config.max_epsilon is not None:
        accountant.check_budget(config.noise_multiplier, q, config.delta, config.max_epsilon)
    if config.mode == "local":
        std = noise_std(config.noise_multiplier, config.clip_norm)
        out = {k: v.to(torch.float32) for k, v in aggregate.items()}
    else:
        std = noise_std(config.noise_multiplier, config.clip_norm, denominator)
        out = add_gaussian_noise(aggregate, std, generator)
    accountant.step(config.noise_multiplier, q)
    return out, privacy_record(config, accountant, sample_rate=q, noise_std=std, num_clients=num_clients)


def _dense(x: DeltaTensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.to_dense()
