"""Differential privacy primitives (clipping, calibrated Gaussian noise, RDP accounting, the DP config
and manifest record) and per-client anomaly scores. See ``docs/privacy.md``."""

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
from fedmerge.privacy.clipping import clip_delta, clip_factor, delta_norm
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
