"""Server-side safeguards of a round: per-reply screening (DP clip, anomaly scores, rejection) and the
DP release at commit. The round engine (``judge.py``, ``commit.py``) calls these; see ``docs/flower.md``
(DP and anomaly keys).

Screening one accepted-so-far reply τ_i of client i, *before* it is folded (streaming, O(P)):

    norm_i        = ‖τ_i‖₂                                    (as received, before any server clip)
    norm_score_i  = |norm_i − med_prev| / (1.4826 · MAD_prev)  (robust z-score against the accepted norms
                                                                recorded in the base version's manifest)
    cosine_i      = ⟨τ_i, τ_prev⟩ / (‖τ_i‖ ‖τ_prev‖)          (τ_prev = the base version's merged delta)

The cosine is to the *previous* round's aggregate, not this round's: this round's aggregate exists only
after every reply has been folded, and a streaming server cannot revisit the deltas. The first round
after a full-weights root has no previous aggregate (cosine None) and no norm reference (score None),
so nothing is rejected there. A client is rejected when norm_score > ``reject-anomalies`` (> 0) or
cosine < ``reject-min-cosine`` (> −1).

DP (user-level DP-FedAvg, McMahan et al. 2018): in central mode the server clips every reply again to
C (a no-op for honest clients without error feedback; it enforces the sensitivity when the residual
or a dishonest client pushes ‖τ̂_i‖ above C) and folds it with unit weight. At commit, for
``fedavg``/``norm_bounded(fedavg)`` whose output is Σ τ̄_i / n over the n accepted clients, the mean is
rescaled to the fixed-denominator estimator Σ τ̄_i / D, D = the sampled cohort size (fixed before any
reply arrives), and N(0, (z·C/D)²) is added; the accountant is charged once with q = D / N_connected.
In local mode the clients noised already: nothing is added and each release is charged with q = 1.
"""

from __future__ import annotations

import math
import secrets
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import InvalidSubmission
from fedmerge.flower.config import RunConfig, dp_calibrated
from fedmerge.privacy import RdpAccountant, clip_delta, cosine, delta_norm, privatize_aggregate
from fedmerge.privacy.anomaly import MAD_TO_SIGMA, CosineReference, anomaly_scores
from fedmerge.seeds import labelled_seed
from fedmerge.store import ModelStore, Version

ANOMALY_KEY = "anomaly"


class AnomalousSubmission(InvalidSubmission):
    """A well-formed reply rejected by the anomaly thresholds (``reject-anomalies``/``reject-min-cosine``)."""


@dataclass(frozen=True)
class Reference:
    """What a round screens against: the base version's merged delta and its accepted clients' norms."""

    version_id: str | None = None
    aggregate: Mapping[str, torch.Tensor] | None = None
    norms: tuple[float, ...] = ()

    def norm_score(self, norm: float) -> float | None:
        """Robust z-score of ``norm`` against the reference norms (None with fewer than 2 of them)."""
        if len(self.norms) < 2:
            return None
        med = statistics.median(self.norms)
        mad = statistics.median([abs(v - med) for v in self.norms])
        scale = MAD_TO_SIGMA * mad if mad > 0 else max(1e-12 * abs(med), 1e-30)
        return abs(norm - med) / scale

    @cached_property
    def compared(self) -> Mapping[str, torch.Tensor] | CosineReference | None:
        """The aggregate as each reply's cosine reads it: prepared once when it is in memory (a dict),
        as it is when it is a store view read one tensor at a time (large models)."""
        if isinstance(self.aggregate, dict):
            return CosineReference(self.aggregate)
        return self.aggregate


def reference_for(store: ModelStore, base: Version, *, lazy: bool = False) -> Reference:
    """The screening reference of a round on ``base`` (empty for a full-weights root). ``lazy``: the
    aggregate is a store view, read one tensor at a time when it is compared (large models)."""
    if base.kind == "full":
        return Reference(base.id)
    clients = base.metadata.get(ANOMALY_KEY, {}).get("clients", {})
    norms = tuple(
        float(c["norm"]) for c in clients.values() if c.get("norm") is not None and not c.get("rejected")
    )
    return Reference(base.id, store.delta_view(base) if lazy else store.load_delta(base), norms)


def screen_delta(
    delta: Mapping[str, Any],
    weight: float,
    client_id: str,
    cfg: RunConfig,
    ref: Reference,
    scores: dict[str, dict[str, Any]],
    *,
    norm: float | None = None,
) -> tuple[Mapping[str, Any], float]:
    """Score one reply, reject it (:class:`AnomalousSubmission`) or return (delta to fold, weight).

    The score lands in ``scores[client_id]`` either way. Under central DP the returned delta is
    clipped to ``dp-clip-norm`` and the weight is 1. ``norm``: ‖delta‖₂ when the caller measured it.
    """
    norm = delta_norm(delta) if norm is None else norm
    cos = None if ref.compared is None else cosine(delta, ref.compared)
    z = ref.norm_score(norm)
    reasons = []
    if cfg.screen.anomalies > 0 and z is not None and z > cfg.screen.anomalies:
        limit = cfg.screen.anomalies
        reasons.append(f"norm {norm:.4g} has robust z-score {z:.3g} > reject-anomalies={limit}")
    if cfg.screen.min_cosine > -1 and cos is not None and cos < cfg.screen.min_cosine:
        reasons.append(
            f"cosine {cos:.3f} to the previous aggregate {ref.version_id} < reject-min-cosine="
            f"{cfg.screen.min_cosine:g}"
        )
    scores[client_id] = {"norm": norm, "norm_score_prev": z, "cosine_prev": cos, "rejected": bool(reasons)}
    if reasons:
        raise AnomalousSubmission(
            f"anomalous update from {client_id!r}: " + "; ".join(reasons)
            + " (raise the threshold if honest clients are rejected)"
        )  # fmt: skip
    dp = cfg.dp.config()
    if dp is None or dp.mode != "central":
        return delta, weight
    clipped, _ = clip_delta(delta, dp.clip_norm)
    scores[client_id]["server_clip_factor"] = 1.0 if norm <= dp.clip_norm else dp.clip_norm / norm
    return clipped, 1.0


def prior_accountant(store: ModelStore, base: Version) -> RdpAccountant:
    """The RDP ledger of the newest version in ``base``'s first-parent chain that recorded one."""
    version: Version | None = base
    while version is not None:
        privacy = version.privacy or {}
        if "accountant" in privacy:
            return RdpAccountant.from_state_dict(privacy["accountant"])
        version = store.get(version.parents[0]) if version.parents else None
    return RdpAccountant()


def noise_generator(cfg: RunConfig, round_: int, attempt: int) -> torch.Generator:
    """Secret (``dp-noise-seed = -1``: from the OS) or reproducible from (dp-noise-seed, round, attempt)."""
    if cfg.dp.noise_seed < 0:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return torch.Generator().manual_seed(labelled_seed("dp-central", cfg.dp.noise_seed, round_, attempt))


def privatize_round(
    merged: StateDict,
    cfg: RunConfig,
    accountant: RdpAccountant,
    *,
    cohort: int,
    connected: int,
    accepted: int,
    round_: int,
    attempt: int,
) -> tuple[StateDict, dict[str, Any] | None]:
    """(released aggregate, manifest privacy record); unchanged and None when DP is off (module doc)."""
    dp = cfg.dp.config()
    if dp is None:
        return merged, None
    calibrated = dp.mode == "local" or dp_calibrated(cfg)
    if dp.mode == "central" and dp_calibrated(cfg):
        merged = {k: v * (accepted / cohort) for k, v in merged.items()}  # Σ τ̄_i / n → Σ τ̄_i / D
    out, record = privatize_aggregate(
        merged,
        dp,
        accountant,
        denominator=float(cohort),
        sample_rate=min(1.0, cohort / max(connected, 1)),
        num_clients=accepted,
        generator=noise_generator(cfg, round_, attempt),
    )
    record.update(
        {
            "calibrated": calibrated,
            "aggregator": cfg.aggregation.name,
            "denominator": cohort,
            "weights": "unit (every accepted client weighs 1; num-examples are not used)",
        }
    )
    return out, record


def anomaly_metadata(
    scores: Mapping[str, Mapping[str, Any]], ref: Reference, cfg: RunConfig
) -> dict[str, Any]:
    """The manifest's ``anomaly`` section: per client the screening values plus this round's robust
    norm z-score among the accepted (``anomaly_scores`` on the norms). Under central DP the values
    are withheld (they are functions of individual clipped deltas, not covered by the DP release)."""
    accepted = {c: float(s["norm"]) for c, s in scores.items() if not s["rejected"]}
    in_round = anomaly_scores(accepted) if accepted else {}
    clients: dict[str, dict[str, Any]] = {}
    for cid in sorted(scores):
        item = {k: _finite(v) for k, v in scores[cid].items()}
        if cid in in_round:
            item["norm_score"] = _finite(in_round[cid]["norm_score"])
        clients[cid] = item
    dp = cfg.dp.config()
    if dp is not None and dp.mode == "central":
        clients = {cid: {"rejected": s["rejected"]} for cid, s in clients.items()}
    return {
        ANOMALY_KEY: {
            "reference_version": ref.version_id if ref.aggregate is not None else None,
            "cosine_to": "the previous version's merged delta",
            "reject_anomalies": cfg.screen.anomalies,
            "reject_min_cosine": cfg.screen.min_cosine,
            "withheld": dp is not None and dp.mode == "central",
            "clients": clients,
        }
    }


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
