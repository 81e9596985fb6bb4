"""The groups of a fedmerge run's settings (:class:`~fedmerge.flower.config.RunConfig` holds one of each).

Each group is a small frozen dataclass for one concept. A field's run-config key is declared once and
derived mechanically: the group's :attr:`SettingsGroup.PREFIX` followed by the field's name in
kebab-case (``BulkSettings.threshold_bytes`` → ``bulk-threshold-bytes``), or the ``key`` in the
field's metadata where the key has no common prefix (``AggregationSettings.name`` → ``aggregator``).
A field whose ``key`` metadata is None is not a run-config key itself (``AggregationSettings.params``:
the ``aggregator.*`` keys). :meth:`SettingsGroup.problems` names each value out of its range, one
short line each, in the words of the run-config keys; checks that span groups live in
:mod:`fedmerge.flower.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from fedmerge.codec import CodecConfig
from fedmerge.errors import ConfigError
from fedmerge.privacy.config import DPConfig

if TYPE_CHECKING:  # the ClientApp reads this module and must not load aggregators
    from fedmerge.aggregators.server_optimizer import ServerOptimizer

Mode = Literal["full", "lora"]
LoraSpace = Literal["product", "stack", "factors"]
KEY = "key"  # field metadata: the run-config key, where it is not the group's prefix + kebab-case name
DOWNLINK_VALUES = ("fp32", "fp16", "bf16", "int8", "int4", "sign")


def round_defaults(aggregator: str) -> dict[str, Any]:
    """The parameters ``aggregator`` declares for federated rounds ({} for an unknown name)."""
    from fedmerge.aggregators import available, get

    return dict(get(aggregator).round_defaults) if aggregator in available() else {}


def failed(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that do not hold."""
    return [msg for ok, msg in checks if not ok]


class SettingsGroup:
    """What every group shares: its key prefix, the keys of its fields, and its range checks."""

    PREFIX: ClassVar[str] = ""

    @classmethod
    def key_fields(cls) -> dict[str, dataclasses.Field[Any]]:
        """Run-config key → field, for the fields that are keys (in declaration order)."""
        out: dict[str, dataclasses.Field[Any]] = {}
        for f in fields(cls):  # type: ignore[arg-type]  # every subclass is a dataclass
            key = f.metadata.get(KEY, cls.PREFIX + f.name.replace("_", "-"))
            if key is not None:
                out[key] = f
        return out

    def items(self) -> Iterator[tuple[str, Any]]:
        """(run-config key, value) of each field that is a key."""
        for key, f in self.key_fields().items():
            yield key, getattr(self, f.name)

    def problems(self) -> list[str]:
        """What is out of range (empty when nothing is); one short line per problem."""
        return []


@dataclass(frozen=True)
class RoundSettings(SettingsGroup):
    """How a round samples clients, waits for them, and bounds what they send (keys as named)."""

    fraction: float = 1.0
    min_clients: int = 2
    min_valid: int = 2
    round_deadline_s: float = 120.0
    wait_for_nodes_s: float = 60.0
    max_retries: int = 1
    max_package_bytes: int = 256 << 20
    max_num_examples: int = 10_000_000
    init_base: bool = True

    def problems(self) -> list[str]:
        checks = [
            (0.0 < self.fraction <= 1.0, f"fraction={self.fraction} must be in (0, 1]"),
            (self.min_clients >= 1, f"min-clients={self.min_clients} must be ≥ 1"),
            (
                1 <= self.min_valid <= max(self.min_clients, 1),
                f"min-valid={self.min_valid} must be in [1, min-clients={self.min_clients}]",
            ),
            (self.round_deadline_s > 0, f"round-deadline-s={self.round_deadline_s} must be > 0"),
            (self.wait_for_nodes_s >= 0, f"wait-for-nodes-s={self.wait_for_nodes_s} must be ≥ 0"),
            (self.max_retries >= 0, f"max-retries={self.max_retries} must be ≥ 0"),
            (self.max_package_bytes >= 1, f"max-package-bytes={self.max_package_bytes} must be ≥ 1"),
            (self.max_num_examples >= 1, f"max-num-examples={self.max_num_examples} must be ≥ 1"),
        ]
        return failed(checks)


@dataclass(frozen=True)
class TrainingSettings(SettingsGroup):
    """What clients fine-tune and where: the full model or a LoRA adapter (``mode``, ``lora-*``), the
    device (``client-device``: auto = cuda when the node has a GPU, cpu, cuda), and, for aggregators that
    merge with each client's diagonal Fisher, the number of local examples it is estimated on
    (``fisher-examples``, fedmerge/delta/fisher.py)."""

    mode: Mode = "full"
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_space: LoraSpace = "product"
    client_device: str = "auto"
    fisher_examples: int = 256

    def problems(self) -> list[str]:
        checks = [
            (self.lora_rank >= 1, f"lora-rank={self.lora_rank} must be ≥ 1"),
            (self.lora_alpha > 0, f"lora-alpha={self.lora_alpha} must be > 0"),
            (
                self.client_device in ("auto", "cpu", "cuda"),
                f"client-device={self.client_device!r} must be 'auto', 'cpu' or 'cuda'",
            ),
        ]
        return failed(checks)


@dataclass(frozen=True)
class AggregationSettings(SettingsGroup):
    """The aggregator (key ``aggregator``) and its parameters (keys ``aggregator.<param>``, passed to
    :func:`fedmerge.aggregators.create` as they are, over its ``round_defaults``)."""

    name: str = field(default="ties", metadata={KEY: "aggregator"})
    params: dict[str, Any] = field(default_factory=lambda: round_defaults("ties"), metadata={KEY: None})

    def problems(self) -> list[str]:
        from fedmerge.aggregators import available

        if self.name in available():
            return []
        return [f"aggregator={self.name!r} is not registered; choose one of {sorted(available())}"]


@dataclass(frozen=True)
class ServerOptSettings(SettingsGroup):
    """The server optimiser on the merged delta (``server-*``, fedmerge/aggregators/server_optimizer.py):
    none | avgm | adam | yogi | adagrad; ``server-lr`` / ``server-tau`` = -1 take its default."""

    PREFIX = "server-"
    optimizer: str = "none"
    lr: float = -1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = -1.0

    def create(self) -> ServerOptimizer:
        """The server optimiser these keys describe (:class:`ConfigError` when they describe none)."""
        from fedmerge.aggregators.server_optimizer import ServerOptimizer

        return ServerOptimizer(
            self.optimizer,
            lr=None if self.lr == -1.0 else self.lr,
            momentum=self.momentum,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=None if self.tau == -1.0 else self.tau,
        )

    def problems(self) -> list[str]:
        try:
            self.create()
        except ConfigError as exc:
            return [f"server-*: {exc} (server-lr and server-tau take -1 for the optimiser's default)"]
        return []


def _codec(density: float, values: str, rank: int, *, error_feedback: bool, deflate: bool) -> CodecConfig:
    """Top-k at ``density`` (dense at 1), ``values``, factor pairs at ``rank`` (0 = none), the package
    deflated when that makes it smaller."""
    return CodecConfig(
        sparsify="topk" if density < 1.0 else "none",
        density=density,
        values=values,  # type: ignore[arg-type]  # CodecConfig checks it
        error_feedback=error_feedback,
        rank=rank,
        deflate=deflate,
    )


@dataclass(frozen=True)
class CodecSettings(SettingsGroup):
    """How clients compress their updates (``codec-*``): top-k at ``codec-density`` (1 = dense) with
    ``codec-values`` quantisation, with or without error feedback; ``codec-rank`` > 0 sends 2-D tensors
    as rank-``codec-rank`` factor pairs instead (:mod:`fedmerge.codec.low_rank`); ``codec-deflate``
    sends each package as one DEFLATE stream when that is smaller (:mod:`fedmerge.codec.container`)."""

    PREFIX = "codec-"
    density: float = 0.1
    values: str = "int8"
    error_feedback: bool = True
    rank: int = 0
    deflate: bool = True

    def config(self) -> CodecConfig:
        """The codec clients use (:class:`ConfigError` for an invalid density or value format)."""
        return _codec(
            self.density, self.values, self.rank, error_feedback=self.error_feedback, deflate=self.deflate
        )

    def problems(self) -> list[str]:
        try:
            self.config()
        except ConfigError as exc:
            return [f"codec-density/codec-values/codec-rank: {exc}"]
        return []


@dataclass(frozen=True)
class DownlinkSettings(SettingsGroup):
    """What the server sends clients (``downlink-*``): ``downlink-density`` < 1 or ``downlink-rank`` > 0
    sends the compressed update (top-k at that density, 2-D tensors as rank-``downlink-rank`` factor
    pairs when > 0, ``downlink-values`` quantisation, error feedback on the server; with
    ``downlink-deflate`` the package is deflated when that is smaller) instead of the weights.
    ``downlink-base-at-nodes = true``: the nodes hold the base checkpoint already (their own copy: a
    node's ``base-path``, its node-state directory, or a base its ClientApp builds), so a node's first
    message names the store's root version by weights digest instead of carrying it (a version the
    federation made is sent as before); a node that holds no copy with that digest replies
    ``MissingBase`` and is sent the weights in its next message (a plain Flower client, which reads
    ``"arrays"``, is such a node)."""

    PREFIX = "downlink-"
    density: float = 1.0
    values: str = "int8"
    rank: int = 0
    deflate: bool = True
    base_at_nodes: bool = False

    @property
    def compressed(self) -> bool:
        """Whether clients get the compressed update rather than the full weights."""
        return self.density < 1.0 or self.rank > 0

    def config(self) -> CodecConfig:
        """The server's downlink codec (:class:`ConfigError` for invalid settings)."""
        return _codec(self.density, self.values, self.rank, error_feedback=True, deflate=self.deflate)

    def problems(self) -> list[str]:
        out = []
        if not 0.0 < self.density <= 1.0:
            out.append(f"downlink-density={self.density} must be in (0, 1] (1 sends full weights)")
        if self.values not in DOWNLINK_VALUES:
            out.append(f"downlink-values={self.values!r} must be one of {', '.join(DOWNLINK_VALUES)}")
        if out:
            return out
        try:
            self.config()
        except ConfigError as exc:
            return [f"downlink-rank: {exc}"]
        return []


@dataclass(frozen=True)
class DPSettings(SettingsGroup):
    """User-level DP-FedAvg (``dp-*``, docs/privacy.md): ``dp-clip-norm`` = 0 turns DP off;
    ``dp-noise-seed`` = -1 draws a secret random seed."""

    PREFIX = "dp-"
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    mode: str = "central"
    allow_any_aggregator: bool = False
    noise_seed: int = -1

    def config(self) -> DPConfig | None:
        """The DP settings, or None when ``dp-clip-norm`` is 0 (DP off)."""
        if self.clip_norm == 0.0:
            return None
        return DPConfig(self.clip_norm, self.noise_multiplier, self.delta, self.mode)

    def problems(self) -> list[str]:
        if self.clip_norm == 0.0:
            return []
        if self.clip_norm < 0:
            return [f"dp-clip-norm={self.clip_norm} must be > 0 (or 0 to turn DP off)"]
        out = []
        if self.noise_seed < -1:
            out.append(f"dp-noise-seed={self.noise_seed} must be ≥ 0, or -1 for a secret random seed")
        try:
            self.config()
        except ConfigError as exc:
            out.append(
                f"dp-*: {exc}".replace("DPConfig.clip_norm", "dp-clip-norm")
                .replace("DPConfig.noise_multiplier", "dp-noise-multiplier")
                .replace("DPConfig.delta", "dp-delta")
                .replace("DPConfig.mode", "dp-mode")
            )
        return out


@dataclass(frozen=True)
class ScreenSettings(SettingsGroup):
    """Anomaly rejection before folding (``reject-*``, server/judge.py): a robust norm z-score above
    ``reject-anomalies`` (0 = off) or a cosine to the others below ``reject-min-cosine`` (-1 = off)."""

    PREFIX = "reject-"
    anomalies: float = 0.0
    min_cosine: float = -1.0

    def problems(self) -> list[str]:
        out = []
        if self.anomalies < 0:
            out.append(
                f"reject-anomalies={self.anomalies} must be ≥ 0 (a robust norm z-score; 0 turns it off)"
            )
        if not -1.0 <= self.min_cosine <= 1.0:
            out.append(f"reject-min-cosine={self.min_cosine} must be in [-1, 1] (-1 turns it off)")
        return out


@dataclass(frozen=True)
class BulkSettings(SettingsGroup):
    """Large payloads (``bulk-*``, docs/flower.md "Large payloads"): a package above
    ``bulk-threshold-bytes`` goes through the ServerApp's bulk endpoint and the reply carries only its
    sha256 and size.

    ``address`` is the HOST:PORT the endpoint binds ("" = off; port 0 = any free), ``public_address``
    what clients dial ("" = ``address`` with the bound port), ``spool_dir`` where uploads land ("" =
    <store>.spool beside the store), and an upload leaving less free disk than ``spool_reserve_bytes``
    is refused. TLS (PEM files on the server): certificate chain and key; with a client CA, nodes must
    present a certificate it issued (mutual TLS). A non-loopback address needs TLS unless
    ``allow_insecure`` (then only the per-node round token authenticates uploads). ``downlink``: a
    node that needs the round's base (above the threshold) gets a reference and downloads it there
    instead of Flower's "arrays"; set it only when every node runs fedmerge's ClientApp.
    """

    PREFIX = "bulk-"
    address: str = ""
    public_address: str = ""
    threshold_bytes: int = 32 << 20
    spool_dir: str = ""
    spool_reserve_bytes: int = 256 << 20
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    allow_insecure: bool = False
    downlink: bool = False

    def problems(self) -> list[str]:
        """Sizes, HOST:PORT addresses, and the endpoint's TLS (:meth:`tls_problems`)."""
        errors = []
        if self.threshold_bytes < 0:
            errors.append(f"bulk-threshold-bytes={self.threshold_bytes} must be ≥ 0")
        if self.spool_reserve_bytes < 0:
            errors.append(f"bulk-spool-reserve-bytes={self.spool_reserve_bytes} must be ≥ 0")
        addresses_ok = True
        for key, value in (("bulk-address", self.address), ("bulk-public-address", self.public_address)):
            host, sep, port = value.rpartition(":")
            if value and (not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535):
                errors.append(f"{key}={value!r} must be HOST:PORT (port 0 binds any free port)")
                addresses_ok = False
        if self.downlink and not self.address:
            errors.append("bulk-downlink = true needs the bulk endpoint; set bulk-address")
        if self.public_address and not self.address:
            errors.append("bulk-public-address is set but bulk-address is empty; set bulk-address to bind")
        tls_keys = {"bulk-tls-cert": self.tls_cert, "bulk-tls-key": self.tls_key,
                    "bulk-tls-client-ca": self.tls_client_ca}  # fmt: skip
        if not self.address:
            set_keys = [k for k, v in tls_keys.items() if v]
            errors.extend(f"{k} is set but bulk-address is empty; set bulk-address" for k in set_keys)
            return errors
        if addresses_ok:
            errors.extend(self.tls_problems())
        return errors

    def tls_problems(self) -> list[str]:
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

        tls = bool(self.tls_cert or self.tls_key)
        problem = bulk_insecure_bind_problem(self.address, tls, self.allow_insecure)
        if problem is not None:
            return [problem]
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "bulk-tls-key" if self.tls_cert else "bulk-tls-cert"
            return [
                f"{missing} is empty: bulk-tls-cert and bulk-tls-key go together (certificate and its key)"
            ]
        if self.tls_client_ca and not tls:
            return ["bulk-tls-client-ca is set without bulk-tls-cert/bulk-tls-key; mutual TLS needs both"]
        if not tls:
            return []
        problems = []
        try:
            leaf = check_key_pair(self.tls_cert, self.tls_key, "bulk-tls-cert", "bulk-tls-key")
            dialled = self.public_address or self.address
            host = dialled.rpartition(":")[0]
            if host.strip("[]") not in ("0.0.0.0", "::") and not names_host(leaf, host):
                problems.append(
                    f"bulk-tls-cert does not name {host!r}, the host clients dial "
                    f"({'bulk-public-address' if self.public_address else 'bulk-address'}): it names "
                    f"{certificate_names(leaf)}; nodes would refuse the handshake. Reissue it with that "
                    "subjectAltName, or set bulk-public-address to one of its names"
                )
        except TlsMaterialError as exc:
            problems.append(str(exc))
        if self.tls_client_ca:
            try:
                read_certificates(self.tls_client_ca, "bulk-tls-client-ca")
            except TlsMaterialError as exc:
                problems.append(str(exc))
        return problems


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


@dataclass(frozen=True)
class FaultSettings(SettingsGroup):
    """Simulated faults (``fault-*``, fedmerge/flower/client/faults.py): probabilities per (seed,
    round, partition) that a client drops out or straggles by ``fault-straggler-delay-s``; 0 = off."""

    PREFIX = "fault-"
    dropout: float = 0.0
    straggler: float = 0.0
    straggler_delay_s: float = 0.0

    def problems(self) -> list[str]:
        checks = [
            (0.0 <= self.dropout <= 1.0, f"fault-dropout={self.dropout} must be in [0, 1]"),
            (0.0 <= self.straggler <= 1.0, f"fault-straggler={self.straggler} must be in [0, 1]"),
            (
                self.straggler_delay_s >= 0,
                f"fault-straggler-delay-s={self.straggler_delay_s} must be ≥ 0",
            ),
        ]
        return failed(checks)


@dataclass(frozen=True)
class EvaluationSettings(SettingsGroup):
    """Evaluation by the clients (keys as named). ``client-test-metrics``: clients evaluate the base and
    their fine-tuned model on their own test split in each train reply (base-test-* / test-* metrics);
    false: train only trains, as Flower's template ClientApps do. Federated evaluation
    (flower/server/evaluation.py): after every ``evaluate-every``-th committed round, "evaluate"
    messages with the new weights go to max(⌊fraction-evaluate·N⌋, min-evaluate-nodes) nodes (at most
    N); ``fraction-evaluate`` = 0 turns it off (Flower's strategies default to 1.0)."""

    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 2
    evaluate_every: int = 1
    client_test_metrics: bool = True

    def problems(self) -> list[str]:
        checks = [
            (
                0.0 <= self.fraction_evaluate <= 1.0,
                f"fraction-evaluate={self.fraction_evaluate} must be in [0, 1] (0 = no federated evaluation)",
            ),
            (self.min_evaluate_nodes >= 1, f"min-evaluate-nodes={self.min_evaluate_nodes} must be ≥ 1"),
            (self.evaluate_every >= 1, f"evaluate-every={self.evaluate_every} must be ≥ 1 (rounds)"),
        ]
        return failed(checks)


@dataclass(frozen=True)
class TrackerSettings(SettingsGroup):
    """Experiment tracking (fedmerge/tracking.py): ``tracking`` = "" (off), "tensorboard" or "mlflow";
    ``tracking-dir`` "" = <store>.tracking beside the store for TensorBoard, MLflow's own configuration
    for MLflow."""

    PREFIX = "tracking-"
    backend: str = field(default="", metadata={KEY: "tracking"})
    dir: str = ""

    def problems(self) -> list[str]:
        from fedmerge.tracking import TRACKERS

        if self.backend and self.backend not in TRACKERS:
            return [f'tracking={self.backend!r} must be one of {list(TRACKERS)} (or "" to turn it off)']
        return []
