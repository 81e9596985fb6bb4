"""Differential privacy primitives (clipping — whose home is :mod:`fedmerge.delta.clipping`, under the
aggregators that also clip —, calibrated Gaussian noise, RDP accounting, the DP config and manifest
record) and per-client anomaly scores. See ``docs/privacy.md``."""

import importlib
from typing import TYPE_CHECKING, Any

# Names are loaded on first use (PEP 562), so a client that needs only ``privacy.config`` and
# ``privacy.mechanism`` does not import the anomaly scores and, through them, the aggregators.
_HOME = {
    **dict.fromkeys(
        ("DEFAULT_ORDERS", "ContributionLedger", "PrivacyBudgetExceeded", "RdpAccountant", "compute_rdp",
         "noise_multiplier_for", "rdp_sampled_gaussian", "rdp_to_epsilon"),
        "accountant",
    ),
    **dict.fromkeys(("anomaly_scores", "cosine", "merge_with_rejection", "robust_z"), "anomaly"),
    **dict.fromkeys(("clip_delta", "clip_factor", "delta_norm"), "fedmerge.delta.clipping"),
    **dict.fromkeys(("DPConfig", "privacy_record"), "config"),
    **dict.fromkeys(("privatize_aggregate", "privatize_client_delta"), "mechanism"),
    **dict.fromkeys(("add_gaussian_noise", "noise_std"), "noise"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fedmerge.privacy' has no attribute {name!r}")
    home = _HOME[name]
    return getattr(importlib.import_module(home if "." in home else f"fedmerge.privacy.{home}"), name)


if TYPE_CHECKING:
    from fedmerge.delta.clipping import clip_delta, clip_factor, delta_norm
    from fedmerge.privacy.accountant import (
        DEFAULT_ORDERS,
        ContributionLedger,
        PrivacyBudgetExceeded,
        RdpAccountant,
        compute_rdp,
        noise_multiplier_for,
        rdp_sampled_gaussian,
        rdp_to_epsilon,
    )
    from fedmerge.privacy.anomaly import anomaly_scores, cosine, merge_with_rejection, robust_z
    from fedmerge.privacy.config import DPConfig, privacy_record
    from fedmerge.privacy.mechanism import privatize_aggregate, privatize_client_delta
    from fedmerge.privacy.noise import add_gaussian_noise, noise_std

__all__ = [
    "DEFAULT_ORDERS",
    "ContributionLedger",
    "DPConfig",
    "PrivacyBudgetExceeded",
    "RdpAccountant",
    "add_gaussian_noise",
    "anomaly_scores",
    "clip_delta",
    "clip_factor",
    "compute_rdp",
    "cosine",
    "delta_norm",
    "merge_with_rejection",
    "noise_multiplier_for",
    "noise_std",
    "privacy_record",
    "privatize_aggregate",
    "privatize_client_delta",
    "rdp_sampled_gaussian",
    "rdp_to_epsilon",
    "robust_z",
]
