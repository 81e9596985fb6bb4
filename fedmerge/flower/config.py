"""The typed run configuration of a fedmerge federation, parsed once from Flower's ``context.run_config``.

Keys are Flower's kebab-case (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridable with
``flwr run . --run-config "num-rounds=5 aggregator='fedavg'"``). Aggregator hyper-parameters are keys
prefixed ``aggregator.`` (e.g. ``"aggregator.divisor" = "weight"``) and are passed to
:func:`fedmerge.aggregators.create` as they are. Every key missing from the run config takes the
default below; wrong types and out-of-range values are collected and reported together in one
:class:`~fedmerge.errors.ConfigError`, one short line per problem.

A Flower app's own keys coexist with fedmerge's:

* the names Flower's templates and strategies use for the same settings are accepted
  (:data:`FLOWER_ALIASES`: ``num-server-rounds`` → ``num-rounds``, ``fraction-train`` /
  ``fraction-fit`` → ``fraction``, ``min-train-nodes`` / ``min-fit-nodes`` → ``min-clients``);
  giving a name and its alias different values is an error;
* a key fedmerge does not know is kept in :attr:`RunConfig.extra`, passed to the clients in every
  ``train`` message's ``"config"`` record, and logged once per process;
* unless it is a near-miss of a known key (``num-round``, ``batch_size``: :func:`near_miss`, by
  :mod:`difflib` similarity), which is an error naming the key and the suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

from fedmerge.codec import CodecConfig
from fedmerge.errors import ConfigError
from fedmerge.federation_settings import FederationSettings, field_type
from fedmerge.privacy.config import DPConfig

if TYPE_CHECKING:  # the ClientApp reads this module and must not load aggregators
    from fedmerge.aggregators.server_optimizer import ServerOptimizer

Mode = Literal["full", "lora"]
LoraSpace = Literal["product", "stack", "factors"]
AGGREGATOR_PREFIX = "aggregator."
# An ``aggregator.<param>`` key with this value is not set: the aggregator's own round default (its
# ``round_defaults``) or its constructor default applies. pyproject.toml declares every parameter of
# every registered aggregator with this value, so ``flwr run --run-config`` can override any of them.
UNSET = ""


def round_defaults(aggregator: str) -> dict[str, Any]:
    """The parameters ``aggregator`` declares for federated rounds ({} for an unknown name)."""
    from fedmerge.aggregators import available, get

    return dict(get(aggregator).round_defaults) if aggregator in available() else {}


def aggregator_param_names() -> list[str]:
    """Every keyword parameter of every registered aggregator (kebab-case, as run-config keys), except
    those the round sets and ``inner_params`` (a mapping; Flower's run-config values are scalars)."""
    from fedmerge.aggregators import available, get
    from fedmerge.registry import accepted_params

    names = {p for name in available() for p in accepted_params(get(name))}
    return sorted(n.replace("_", "-") for n in names - set(RESERVED_AGGREGATOR_PARAMS) - {"inner_params"})


# Set by the round itself: the run's ``seed``, the round number, the server's device.
RESERVED_AGGREGATOR_PARAMS = ("seed", "round", "device")

log = logging.getLogger("fedmerge.config")

# Flower's names (its templates' pyproject keys and FedAvg's parameters) → fedmerge's key
FLOWER_ALIASES: dict[str, str] = {
    "num-server-rounds": "num-rounds",
    "fraction-train": "fraction",
    "fraction-fit": "fraction",
    "min-train-nodes": "min-clients",
    "min-fit-nodes": "min-clients",
}
NEAR_MISS_CUTOFF = 0.85  # difflib ratio above which an unknown key is taken for a misspelt known one
_LOGGED_EXTRA: set[str] = set()  # pass-through keys already logged by this process


def near_miss(key: str, known: list[str]) -> str | None:
    """The known key ``key`` most likely misspells (``num-round`` → ``num-rounds``, ``batch_size`` →
    ``batch-size``), or None: the closest by :class:`difflib.SequenceMatcher` ratio ≥
    :data:`NEAR_MISS_CUTOFF`, compared with '_' read as '-' and case ignored."""
    if not known:
        return None
    norm = key.replace("_", "-").lower()
    exact = [k for k in known if k == norm]
    if exact:
        return exact[0]
    close = difflib.get_close_matches(norm, known, n=1, cutoff=NEAR_MISS_CUTOFF)
    return close[0] if close else None


@dataclass(frozen=True)
class RunConfig(FederationSettings):
    """Everything a round needs; attribute ``foo_bar`` is run-config key ``foo-bar``."""

    mode: Mode = "full"
    fraction: float = 1.0
    min_clients: int = 2
    min_valid: int = 2
    round_deadline_s: float = 120.0
    wait_for_nodes_s: float = 60.0
    max_retries: int = 1
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_space: LoraSpace = "product"
    client_device: str = "auto"  # where clients train: auto (cuda when the node has a GPU), cpu, cuda
    aggregator: str = "ties"
    codec_density: float = 0.1
    codec_values: str = "int8"
    codec_error_feedback: bool = True
    # simulated faults (fedmerge/flower/client/faults.py): probabilities per (seed, round, partition); 0 = off
    fault_dropout: float = 0.0
    fault_straggler: float = 0.0
    fault_straggler_delay_s: float = 0.0
    max_package_bytes: int = 256 << 20
    max_num_examples: int = 10_000_000
    # aggregators that merge with each client's diagonal Fisher (side_inputs = ("fisher",)): the number
    # of local training examples a client's Fisher is estimated on (fedmerge/delta/fisher.py)
    fisher_examples: int = 256
    # clients evaluate the base and their fine-tuned model on their own test split in each train reply
    # (base-test-* / test-* metrics, the dashboard's clients' test accuracy); false: train only trains,
    # as Flower's template ClientApps do (use federated evaluation, fraction-evaluate, instead)
    client_test_metrics: bool = True
    # federated evaluation (flower/server/evaluation.py): after every evaluate-every-th committed round,
    # "evaluate" messages with the new weights go to max(⌊fraction-evaluate·N⌋, min-evaluate-nodes)
    # nodes (at most N); 0 = off (Flower's strategies default to 1.0)
    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 2
    evaluate_every: int = 1
    init_base: bool = True
    # experiment tracking (fedmerge/tracking.py): "" = off, "tensorboard" or "mlflow"; tracking-dir ""
    # = <store>.tracking beside the store for TensorBoard, MLflow's own configuration for MLflow
    tracking: str = ""
    tracking_dir: str = ""
    aggregator_params: dict[str, Any] = field(default_factory=lambda: round_defaults("ties"))
    # user-level DP-FedAvg (docs/privacy.md): dp-clip-norm = 0 turns DP off
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    dp_mode: str = "central"
    dp_allow_any_aggregator: bool = False
    dp_noise_seed: int = -1
    # anomaly rejection before folding (server/judge.py): 0 / -1 = off
    reject_anomalies: float = 0.0
    reject_min_cosine: float = -1.0
    downlink_density: float = 1.0  # < 1: send clients the compressed update instead of the weights
    downlink_values: str = "int8"
    # large payloads (docs/flower.md, "Large payloads"): a package above bulk-threshold-bytes goes
    # through the ServerApp's bulk endpoint and the reply carries only its sha256 and size
    bulk_address: str = ""  # host:port the ServerApp's bulk endpoint binds ("" = off; port 0 = any free)
    bulk_public_address: str = ""  # what clients dial ("" = bulk-address with the bound port)
    bulk_threshold_bytes: int = 32 << 20
    bulk_spool_dir: str = ""  # "" = <store>.spool beside the store
    bulk_spool_reserve_bytes: int = 256 << 20  # an upload leaving less free disk than this is refused
    # TLS of the bulk endpoint (PEM files on the server): certificate chain and key; with a client CA,
    # nodes must present a certificate it issued (mutual TLS). A non-loopback bulk-address needs TLS
    # unless bulk-allow-insecure = true (then only the per-node round token authenticates uploads)
    bulk_tls_cert: str = ""
    bulk_tls_key: str = ""
    bulk_tls_client_ca: str = ""
    bulk_allow_insecure: bool = False
    # base weights through the bulk endpoint: a node that needs the round's base (above
    # bulk-threshold-bytes) gets a reference and downloads it there instead of Flower's "arrays".
    # Set it only when every node runs fedmerge's ClientApp (a plain Flower client needs "arrays")
    bulk_downlink: bool = False
    # keys fedmerge does not know (a Flower app's own): passed to clients in the "config" record
    extra: dict[str, Any] = field(default_factory=dict)

    # server optimiser on the merged delta (fedmerge/aggregators/server_optimizer.py); -1 = its default
    server_optimizer: str = "none"  # none | avgm | adam | yogi | adagrad
    server_lr: float = -1.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = -1.0

    def server_opt(self) -> ServerOptimizer:
        """The server optimiser (``server-*`` keys; ``server-lr`` / ``server-tau`` = -1 take the
        optimiser's default)."""
        from fedmerge.aggregators.server_optimizer import ServerOptimizer

        return ServerOptimizer(
            self.server_optimizer,
            lr=None if self.server_lr == -1.0 else self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            tau=None if self.server_tau == -1.0 else self.server_tau,
        )

    def dp(self) -> DPConfig | None:
        """The DP settings, or None when ``dp-clip-norm`` is 0 (DP off)."""
        if self.dp_clip_norm == 0.0:
            return None
        return DPConfig(self.dp_clip_norm, self.dp_noise_multiplier, self.dp_delta, self.dp_mode)

    def codec(self) -> CodecConfig:
        """The codec clients use (top-k at ``codec-density`` with ``codec-values`` quantisation)."""
        return CodecConfig(
            sparsify="topk" if self.codec_density < 1.0 else "none",
            density=self.codec_density,
            values=self.codec_values,  # type: ignore[arg-type]  # checked in parse_run_config
            error_feedback=self.codec_error_feedback,
        )

    def to_flower(self) -> dict[str, Any]:
        """The run config as Flower ``--run-config`` keys (aggregator params flattened)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in NOT_KEYS:
                continue
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        for key, value in self.aggregator_params.items():
            out[AGGREGATOR_PREFIX + key] = value
        return {**out, **self.extra}


NOT_KEYS = ("aggregator_params", "extra")  # RunConfig fields that are not run-config keys themselves


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's run config into a :class:`RunConfig`; every problem reported in one ConfigError."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    agg_params: dict[str, Any] | None = None
    known = {f.name.replace("_", "-"): f for f in fields(RunConfig) if f.name not in NOT_KEYS}
    raw = _resolve_aliases(raw, errors)
    for key, value in raw.items():
        if key.startswith(AGGREGATOR_PREFIX):
            agg_params = {} if agg_params is None else agg_params
            if value == UNSET:
                continue
            if key[len(AGGREGATOR_PREFIX) :] in RESERVED_AGGREGATOR_PARAMS:
                errors.append(f"{key} is set by the round itself; use the run's 'seed' key instead")
                continue
            agg_params[key[len(AGGREGATOR_PREFIX) :].replace("-", "_")] = value  # kebab-case as Flower keys
            continue
        f = known.get(key)
        if f is None:
            guess = near_miss(key, sorted(known) + sorted(FLOWER_ALIASES))
            if guess is not None:
                errors.append(f"unknown key {key!r}: did you mean {guess!r}?")
            else:
                extra[key] = value
            continue
        converted = _convert(key, value, f, errors)
        if converted is not None:
            values[f.name] = converted
    # user keys override the round defaults, never silently drop them
    defaults = round_defaults(values.get("aggregator", "ties"))
    values["aggregator_params"] = {**defaults, **(agg_params or {})}
    values["extra"] = extra
    if errors:
        raise ConfigError("invalid run config: " + "; ".join(errors))
    cfg = RunConfig(**values)
    _check_ranges(cfg, errors)
    if errors:
        raise ConfigError("invalid run config: " + "; ".join(errors))
    new = sorted(set(extra) - _LOGGED_EXTRA)
    if new:
        _LOGGED_EXTRA.update(new)
        log.info("run config keys passed to the clients as they are (not fedmerge's): %s", ", ".join(new))
    return cfg


def _resolve_aliases(raw: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    """``raw`` with Flower's names (:data:`FLOWER_ALIASES`) replaced by fedmerge's; a setting given
    under two names with different values is an error."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # fedmerge key → the name it was given under
    for key, value in raw.items():
        target = FLOWER_ALIASES.get(key, key)
        if target in out and out[target] != value:
            errors.append(f"{given[target]}={out[target]!r} and {key}={value!r} set the same thing; keep one")
            continue
        if target not in out or key == target:
            given[target] = key
        out[target] = value
    return out


def _convert(key: str, value: Any, f: dataclasses.Field[Any], errors: list[str]) -> Any:
    kind = str(f.type)
    if kind.startswith("Literal") or kind in ("Mode", "LoraSpace"):
        choices = get_args(Mode) if kind == "Mode" else get_args(LoraSpace)
        if value not in choices:
            errors.append(f"{key}={value!r} must be one of {list(choices)}")
            return None
        return value
    expected = field_type(f)
    if expected is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}={value!r} must be true or false")
        return None
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{key}={value!r} must be an integer")
        return None
    if expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{key}={value!r} must be a number")
        return None
    if not isinstance(value, str):
        errors.append(f"{key}={value!r} must be a string")
        return None
    return value


def _check_ranges(cfg: RunConfig, errors: list[str]) -> None:
    from fedmerge.aggregators import available, get

    checks = [
        (cfg.num_rounds >= 1, f"num-rounds={cfg.num_rounds} must be ≥ 1"),
        (0.0 < cfg.fraction <= 1.0, f"fraction={cfg.fraction} must be in (0, 1]"),
        (cfg.min_clients >= 1, f"min-clients={cfg.min_clients} must be ≥ 1"),
        (
            1 <= cfg.min_valid <= max(cfg.min_clients, 1),
            f"min-valid={cfg.min_valid} must be in [1, min-clients={cfg.min_clients}]",
        ),
        (cfg.round_deadline_s > 0, f"round-deadline-s={cfg.round_deadline_s} must be > 0"),
        (cfg.wait_for_nodes_s >= 0, f"wait-for-nodes-s={cfg.wait_for_nodes_s} must be ≥ 0"),
        (cfg.max_retries >= 0, f"max-retries={cfg.max_retries} must be ≥ 0"),
        (cfg.seed >= 0, f"seed={cfg.seed} must be ≥ 0"),
        (cfg.local_epochs >= 1, f"local-epochs={cfg.local_epochs} must be ≥ 1"),
        (cfg.lr > 0, f"lr={cfg.lr} must be > 0"),
        (cfg.batch_size >= 1, f"batch-size={cfg.batch_size} must be ≥ 1"),
        (cfg.lora_rank >= 1, f"lora-rank={cfg.lora_rank} must be ≥ 1"),
        (cfg.lora_alpha > 0, f"lora-alpha={cfg.lora_alpha} must be > 0"),
        (
            cfg.client_device in ("auto", "cpu", "cuda"),
            f"client-device={cfg.client_device!r} must be 'auto', 'cpu' or 'cuda'",
        ),
        (cfg.max_package_bytes >= 1, f"max-package-bytes={cfg.max_package_bytes} must be ≥ 1"),
        (cfg.max_num_examples >= 1, f"max-num-examples={cfg.max_num_examples} must be ≥ 1"),
        (
            0.0 <= cfg.fraction_evaluate <= 1.0,
            f"fraction-evaluate={cfg.fraction_evaluate} must be in [0, 1] (0 = no federated evaluation)",
        ),
        (cfg.min_evaluate_nodes >= 1, f"min-evaluate-nodes={cfg.min_evaluate_nodes} must be ≥ 1"),
        (cfg.evaluate_every >= 1, f"evaluate-every={cfg.evaluate_every} must be ≥ 1 (rounds)"),
        (0.0 <= cfg.fault_dropout <= 1.0, f"fault-dropout={cfg.fault_dropout} must be in [0, 1]"),
        (0.0 <= cfg.fault_straggler <= 1.0, f"fault-straggler={cfg.fault_straggler} must be in [0, 1]"),
        (
            cfg.fault_straggler_delay_s >= 0,
            f"fault-straggler-delay-s={cfg.fault_straggler_delay_s} must be ≥ 0",
        ),
        (
            cfg.aggregator in available(),
            f"aggregator={cfg.aggregator!r} is not registered; choose one of {sorted(available())}",
        ),
    ]
    errors.extend(msg for ok, msg in checks if not ok)
    _check_dp(cfg, errors)
    _check_anomaly(cfg, errors)
    _check_bulk(cfg, errors)
    _check_tracking(cfg, errors)
    try:
        cfg.server_opt()
    except ConfigError as exc:
        errors.append(f"server-*: {exc} (server-lr and server-tau take -1 for the optimiser's default)")
    try:
        cfg.codec()
    except ConfigError as exc:
        errors.append(f"codec-density/codec-values: {exc}")
    if not errors:
        _check_side_inputs(cfg, get(cfg.aggregator).side_inputs, errors)
    if not errors:
        try:
            from fedmerge.aggregators import create

            create(cfg.aggregator, **cfg.aggregator_params)
        except (ConfigError, TypeError) as exc:
            errors.append(f"aggregator.* parameters {cfg.aggregator_params}: {exc}")


def needs_fisher(cfg: RunConfig) -> bool:
    """True when the round's aggregator merges with each client's diagonal Fisher."""
    from fedmerge.aggregators import get

    return "fisher" in get(cfg.aggregator).side_inputs


def _check_side_inputs(cfg: RunConfig, needs: tuple[str, ...], errors: list[str]) -> None:
    """Rounds carry one side input, a client's diagonal Fisher (computed on full fine-tuning, unclipped)."""
    unknown = [n for n in needs if n != "fisher"]
    if unknown:
        errors.append(
            f"aggregator={cfg.aggregator!r} needs each client's {', '.join(unknown)} beside its delta, "
            "which federated rounds do not carry; choose another aggregator"
        )
    if "fisher" not in needs:
        return
    if cfg.mode != "full":
        errors.append(
            f"aggregator={cfg.aggregator!r} merges with a Fisher over the model's parameters: it needs "
            f"mode='full' (got {cfg.mode!r})"
        )
    if cfg.dp() is not None:
        errors.append(
            f"aggregator={cfg.aggregator!r} with DP: a client's Fisher is computed from its data and is "
            "neither clipped nor noised; turn DP off (dp-clip-norm=0) or choose another aggregator"
        )
    if cfg.fisher_examples < 1:
        errors.append(f"fisher-examples={cfg.fisher_examples} must be ≥ 1")


def dp_calibrated(cfg: RunConfig) -> bool:
    """True when the aggregator declares its output Σ τ̄_i / n with unit weights (noise std z·C/D
    applies; :attr:`fedmerge.aggregators.Aggregator.dp_calibrated`)."""
    from fedmerge.aggregators import create

    return bool(create(cfg.aggregator, **cfg.aggregator_params).dp_calibrated)


def _check_dp(cfg: RunConfig, errors: list[str]) -> None:
    if cfg.dp_clip_norm == 0.0:
        return
    if cfg.dp_clip_norm < 0:
        errors.append(f"dp-clip-norm={cfg.dp_clip_norm} must be > 0 (or 0 to turn DP off)")
        return
    if cfg.dp_noise_seed < -1:
        errors.append(f"dp-noise-seed={cfg.dp_noise_seed} must be ≥ 0, or -1 for a secret random seed")
    try:
        cfg.dp()
    except ConfigError as exc:
        errors.append(
            f"dp-*: {exc}".replace("DPConfig.clip_norm", "dp-clip-norm")
            .replace("DPConfig.noise_multiplier", "dp-noise-multiplier")
            .replace("DPConfig.delta", "dp-delta")
            .replace("DPConfig.mode", "dp-mode")
        )
        return
    if cfg.dp_mode == "central" and not dp_calibrated(cfg) and not cfg.dp_allow_any_aggregator:
        errors.append(
            f"aggregator={cfg.aggregator!r} is not compatible with central DP: noise on its output is not "
            "calibrated (sign election / selection / median have unbounded sensitivity, docs/privacy.md §4). "
            f"Use aggregator='fedavg' or 'norm_bounded' (inner fedavg), dp-mode='local', or set "
            f"dp-allow-any-aggregator=true to add the noise anyway with the release marked uncalibrated"
        )


def _check_anomaly(cfg: RunConfig, errors: list[str]) -> None:
    if cfg.reject_anomalies < 0:
        errors.append(
            f"reject-anomalies={cfg.reject_anomalies} must be ≥ 0 (a robust norm z-score; 0 turns it off)"
        )
    if not 0.0 < cfg.downlink_density <= 1.0:
        errors.append(f"downlink-density={cfg.downlink_density} must be in (0, 1] (1 sends full weights)")
    if cfg.downlink_values not in ("fp32", "fp16", "bf16", "int8", "int4"):
        errors.append(f"downlink-values={cfg.downlink_values!r} must be one of fp32, fp16, bf16, int8, int4")
    if not -1.0 <= cfg.reject_min_cosine <= 1.0:
        errors.append(f"reject-min-cosine={cfg.reject_min_cosine} must be in [-1, 1] (-1 turns it off)")


def _check_bulk(cfg: RunConfig, errors: list[str]) -> None:
    """The ``bulk-*`` keys: sizes, HOST:PORT addresses, and the endpoint's TLS (:func:`bulk_tls_problems`)."""
    if cfg.bulk_threshold_bytes < 0:
        errors.append(f"bulk-threshold-bytes={cfg.bulk_threshold_bytes} must be ≥ 0")
    if cfg.bulk_spool_reserve_bytes < 0:
        errors.append(f"bulk-spool-reserve-bytes={cfg.bulk_spool_reserve_bytes} must be ≥ 0")
    addresses_ok = True
    for key, value in (("bulk-address", cfg.bulk_address), ("bulk-public-address", cfg.bulk_public_address)):
        host, sep, port = value.rpartition(":")
        if value and (not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535):
            errors.append(f"{key}={value!r} must be HOST:PORT (port 0 binds any free port)")
            addresses_ok = False
    if cfg.bulk_downlink and not cfg.bulk_address:
        errors.append("bulk-downlink = true needs the bulk endpoint; set bulk-address")
    if cfg.bulk_public_address and not cfg.bulk_address:
        errors.append("bulk-public-address is set but bulk-address is empty; set bulk-address to bind")
    tls_keys = {"bulk-tls-cert": cfg.bulk_tls_cert, "bulk-tls-key": cfg.bulk_tls_key,
                "bulk-tls-client-ca": cfg.bulk_tls_client_ca}  # fmt: skip
    if not cfg.bulk_address:
        set_keys = [k for k, v in tls_keys.items() if v]
        errors.extend(f"{k} is set but bulk-address is empty; set bulk-address" for k in set_keys)
        return
    if addresses_ok:
        errors.extend(bulk_tls_problems(cfg))


def bulk_insecure_bind_problem(bind: str, tls: bool, allow_insecure: bool) -> str | None:
    """Why a plaintext bulk endpoint may not bind ``bind`` (HOST:PORT), or None: off loopback it
    needs TLS, unless ``bulk-allow-insecure`` says the operator accepts plaintext on purpose."""
    from fedmerge.metrics import is_loopback

    host = bind.rpartition(":")[0]
    if tls or allow_insecure or is_loopback(host):
        return None
    return (
        f"bulk-address={bind!r} is not a loopback address and the bulk endpoint has no TLS: deltas would "
        "cross the network in plaintext. Set bulk-tls-cert and bulk-tls-key (and bulk-tls-client-ca for "
        "mutual TLS), or bulk-allow-insecure=true to serve plaintext on purpose (e.g. behind a TLS proxy)"
    )


def bulk_tls_problems(cfg: RunConfig) -> list[str]:
    """What is wrong with the bulk endpoint's TLS settings (empty when nothing is), read on the
    ServerApp's machine: ``bulk-tls-cert`` and ``bulk-tls-key`` go together and are a PEM certificate
    chain and the unencrypted PEM key of its first certificate, valid now; that certificate names the
    host clients dial (``bulk-public-address``, else ``bulk-address``'s host); ``bulk-tls-client-ca``
    (mutual TLS) is a PEM bundle of at least one certificate and needs the other two; a plaintext
    endpoint off loopback needs ``bulk-allow-insecure`` (:func:`bulk_insecure_bind_problem`)."""
    from fedmerge.flower.tls import (
        TlsMaterialError,
        certificate_names,
        check_key_pair,
        names_host,
        read_certificates,
    )

    tls = bool(cfg.bulk_tls_cert or cfg.bulk_tls_key)
    problem = bulk_insecure_bind_problem(cfg.bulk_address, tls, cfg.bulk_allow_insecure)
    if problem is not None:
        return [problem]
    if bool(cfg.bulk_tls_cert) != bool(cfg.bulk_tls_key):
        missing = "bulk-tls-key" if cfg.bulk_tls_cert else "bulk-tls-cert"
        return [f"{missing} is empty: bulk-tls-cert and bulk-tls-key go together (certificate and its key)"]
    if cfg.bulk_tls_client_ca and not tls:
        return ["bulk-tls-client-ca is set without bulk-tls-cert/bulk-tls-key; mutual TLS needs both"]
    if not tls:
        return []
    problems = []
    try:
        leaf = check_key_pair(cfg.bulk_tls_cert, cfg.bulk_tls_key, "bulk-tls-cert", "bulk-tls-key")
        dialled = cfg.bulk_public_address or cfg.bulk_address
        host = dialled.rpartition(":")[0]
        if host.strip("[]") not in ("0.0.0.0", "::") and not names_host(leaf, host):
            problems.append(
                f"bulk-tls-cert does not name {host!r}, the host clients dial "
                f"({'bulk-public-address' if cfg.bulk_public_address else 'bulk-address'}): it names "
                f"{certificate_names(leaf)}; nodes would refuse the handshake. Reissue it with that "
                "subjectAltName, or set bulk-public-address to one of its names"
            )
    except TlsMaterialError as exc:
        problems.append(str(exc))
    if cfg.bulk_tls_client_ca:
        try:
            read_certificates(cfg.bulk_tls_client_ca, "bulk-tls-client-ca")
        except TlsMaterialError as exc:
            problems.append(str(exc))
    return problems


def _check_tracking(cfg: RunConfig, errors: list[str]) -> None:
    from fedmerge.tracking import TRACKERS

    if cfg.catalog and not cfg.catalog.startswith(("postgresql://", "postgres://")):
        errors.append(f'catalog={cfg.catalog!r} must be a postgresql://user@host:port/database URL (or "")')
    if cfg.tracking and cfg.tracking not in TRACKERS:
        errors.append(f'tracking={cfg.tracking!r} must be one of {list(TRACKERS)} (or "" to turn it off)')
