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

:class:`RunConfig` holds the settings every federation shares
(:class:`~fedmerge.federation_settings.FederationSettings`: attribute ``foo_bar`` is key ``foo-bar``)
and one group per concept (:mod:`fedmerge.flower.settings`: ``cfg.bulk.threshold_bytes`` is key
``bulk-threshold-bytes``, ``cfg.aggregation.name`` is key ``aggregator``); :func:`run_config_keys`
lists every key with its home.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_args

from fedmerge.errors import ConfigError
from fedmerge.federation_settings import FederationSettings, field_type
from fedmerge.flower.settings import (
    AggregationSettings,
    BulkSettings,
    CodecSettings,
    DownlinkSettings,
    DPSettings,
    EvaluationSettings,
    FaultSettings,
    LoraSpace,
    Mode,
    RoundSettings,
    ScreenSettings,
    ServerOptSettings,
    SettingsGroup,
    TrackerSettings,
    TrainingSettings,
    failed,
    round_defaults,
)

__all__ = [
    "AGGREGATOR_PREFIX",
    "FLOWER_ALIASES",
    "UNSET",
    "RunConfig",
    "aggregator_param_names",
    "dp_calibrated",
    "near_miss",
    "needs_fisher",
    "parse_run_config",
    "run_config_keys",
]

AGGREGATOR_PREFIX = "aggregator."
# An ``aggregator.<param>`` key with this value is not set: the aggregator's own round default (its
# ``round_defaults``) or its constructor default applies. pyproject.toml declares every parameter of
# every registered aggregator with this value, so ``flwr run --run-config`` can override any of them.
UNSET = ""


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
    """Everything a round needs: the shared settings (attribute ``foo_bar`` is key ``foo-bar``), one
    group per concept (:mod:`fedmerge.flower.settings`, each field's key declared there), and
    :attr:`extra`, the keys fedmerge does not know (a Flower app's own), passed to clients in the
    ``"config"`` record."""

    rounds: RoundSettings = field(default_factory=RoundSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    server_opt: ServerOptSettings = field(default_factory=ServerOptSettings)
    codec: CodecSettings = field(default_factory=CodecSettings)
    downlink: DownlinkSettings = field(default_factory=DownlinkSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    screen: ScreenSettings = field(default_factory=ScreenSettings)
    bulk: BulkSettings = field(default_factory=BulkSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    extra: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, SettingsGroup]:
        """Attribute name → group, in declaration order."""
        return {name: getattr(self, name) for name in _group_types()}

    def to_flower(self) -> dict[str, Any]:
        """The run config as Flower ``--run-config`` keys (aggregator params flattened)."""
        out: dict[str, Any] = {
            f.name.replace("_", "-"): getattr(self, f.name) for f in fields(FederationSettings)
        }
        for group in self.groups().values():
            out.update(group.items())
        for key, value in self.aggregation.params.items():
            out[AGGREGATOR_PREFIX + key] = value
        return {**out, **self.extra}


def _group_types() -> dict[str, type[SettingsGroup]]:
    """RunConfig's group attributes → their classes."""
    out: dict[str, type[SettingsGroup]] = {}
    for f in fields(RunConfig):
        factory = f.default_factory
        if isinstance(factory, type) and issubclass(factory, SettingsGroup):
            out[f.name] = factory
    return out


def run_config_keys() -> dict[str, tuple[str | None, dataclasses.Field[Any]]]:
    """Every fedmerge run-config key (``aggregator.*`` aside) → (its group's attribute on
    :class:`RunConfig`, None for the shared settings; the field that holds it)."""
    out: dict[str, tuple[str | None, dataclasses.Field[Any]]] = {
        f.name.replace("_", "-"): (None, f) for f in fields(FederationSettings)
    }
    for name, group in _group_types().items():
        out.update((key, (name, f)) for key, f in group.key_fields().items())
    return out


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's run config into a :class:`RunConfig`; every problem reported in one ConfigError."""
    errors: list[str] = []
    shared: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {name: {} for name in _group_types()}
    extra: dict[str, Any] = {}
    agg_params: dict[str, Any] | None = None
    known = run_config_keys()
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
        home = known.get(key)
        if home is None:
            guess = near_miss(key, sorted(known) + sorted(FLOWER_ALIASES))
            if guess is not None:
                errors.append(f"unknown key {key!r}: did you mean {guess!r}?")
            else:
                extra[key] = value
            continue
        group, f = home
        converted = _convert(key, value, f, errors)
        if converted is not None:
            (shared if group is None else grouped[group])[f.name] = converted
    # user keys override the round defaults, never silently drop them
    defaults = round_defaults(grouped["aggregation"].get("name", "ties"))
    grouped["aggregation"]["params"] = {**defaults, **(agg_params or {})}
    if errors:
        raise ConfigError("invalid run config: " + "; ".join(errors))
    types = _group_types()
    groups: dict[str, Any] = {name: types[name](**values) for name, values in grouped.items()}
    cfg = RunConfig(**shared, **groups, extra=extra)
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
    """Each value in range (the shared settings here, each group's own by its ``problems()``), then
    what spans groups: the aggregator's side inputs, central DP with its aggregator, its parameters."""
    from fedmerge.aggregators import get

    checks = [
        (cfg.num_rounds >= 1, f"num-rounds={cfg.num_rounds} must be ≥ 1"),
        (cfg.seed >= 0, f"seed={cfg.seed} must be ≥ 0"),
        (cfg.local_epochs >= 1, f"local-epochs={cfg.local_epochs} must be ≥ 1"),
        (cfg.lr > 0, f"lr={cfg.lr} must be > 0"),
        (cfg.batch_size >= 1, f"batch-size={cfg.batch_size} must be ≥ 1"),
        (
            not cfg.catalog or cfg.catalog.startswith(("postgresql://", "postgres://")),
            f'catalog={cfg.catalog!r} must be a postgresql://user@host:port/database URL (or "")',
        ),
    ]
    errors.extend(failed(checks))
    problems = {name: group.problems() for name, group in cfg.groups().items()}
    errors.extend(p for group_problems in problems.values() for p in group_problems)
    if cfg.dp.clip_norm > 0 and not problems["dp"] and not problems["aggregation"]:
        _check_dp_aggregator(cfg, errors)
    if not errors:
        _check_side_inputs(cfg, get(cfg.aggregation.name).side_inputs, errors)
    if not errors:
        try:
            from fedmerge.aggregators import create

            create(cfg.aggregation.name, **cfg.aggregation.params)
        except (ConfigError, TypeError) as exc:
            errors.append(f"aggregator.* parameters {cfg.aggregation.params}: {exc}")


def needs_fisher(cfg: RunConfig) -> bool:
    """True when the round's aggregator merges with each client's diagonal Fisher."""
    from fedmerge.aggregators import get

    return "fisher" in get(cfg.aggregation.name).side_inputs


def _check_side_inputs(cfg: RunConfig, needs: tuple[str, ...], errors: list[str]) -> None:
    """Rounds carry one side input, a client's diagonal Fisher (computed on full fine-tuning, unclipped)."""
    name = cfg.aggregation.name
    unknown = [n for n in needs if n != "fisher"]
    if unknown:
        errors.append(
            f"aggregator={name!r} needs each client's {', '.join(unknown)} beside its delta, "
            "which federated rounds do not carry; choose another aggregator"
        )
    if "fisher" not in needs:
        return
    if cfg.training.mode != "full":
        errors.append(
            f"aggregator={name!r} merges with a Fisher over the model's parameters: it needs "
            f"mode='full' (got {cfg.training.mode!r})"
        )
    if cfg.dp.config() is not None:
        errors.append(
            f"aggregator={name!r} with DP: a client's Fisher is computed from its data and is "
            "neither clipped nor noised; turn DP off (dp-clip-norm=0) or choose another aggregator"
        )
    if cfg.training.fisher_examples < 1:
        errors.append(f"fisher-examples={cfg.training.fisher_examples} must be ≥ 1")


def dp_calibrated(cfg: RunConfig) -> bool:
    """True when the aggregator declares its output Σ τ̄_i / n with unit weights (noise std z·C/D
    applies; :attr:`fedmerge.aggregators.Aggregator.dp_calibrated`)."""
    from fedmerge.aggregators import create

    return bool(create(cfg.aggregation.name, **cfg.aggregation.params).dp_calibrated)


def _check_dp_aggregator(cfg: RunConfig, errors: list[str]) -> None:
    """Central DP noise is calibrated only on an aggregator that declares it (:func:`dp_calibrated`)."""
    if cfg.dp.mode != "central" or cfg.dp.allow_any_aggregator:
        return
    try:
        calibrated = dp_calibrated(cfg)
    except (ConfigError, TypeError):
        return  # invalid aggregator.* parameters: reported by _check_ranges
    if not calibrated:
        errors.append(
            f"aggregator={cfg.aggregation.name!r} is not compatible with central DP: noise on its output is "
            "not calibrated (sign election / selection / median have unbounded sensitivity, docs/privacy.md "
            "§4). Use aggregator='fedavg' or 'norm_bounded' (inner fedavg), dp-mode='local', or set "
            "dp-allow-any-aggregator=true to add the noise anyway with the release marked uncalibrated"
        )
