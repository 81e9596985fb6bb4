"""The typed run configuration of a fedmerge federation, parsed once from Flower's ``context.run_config``.

Keys are Flower's kebab-case (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridable with
``flwr run . --run-config "num-rounds=5 aggregator='fedavg'"``). Aggregator hyper-parameters are keys
prefixed ``aggregator.`` (e.g. ``"aggregator.divisor" = "weight"``) and are passed to
:func:`fedmerge.aggregators.create` as they are. Every key missing from the run config takes the
default below; unknown keys, wrong types and out-of-range values are collected and reported together
in one :class:`~fedmerge.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from fedmerge.codec import CodecConfig
from fedmerge.errors import ConfigError

Mode = Literal["full", "lora"]
LoraSpace = Literal["product", "stack", "factors"]
AGGREGATOR_PREFIX = "aggregator."
# Defaults for federated rounds: weights are numbers of examples, so the sign-consensus methods divide
# by the agreeing weights (a weighted mean), and clients have already trimmed (TIES density 1).
ROUND_DEFAULTS: dict[str, dict[str, Any]] = {
    "ties": {"divisor": "weight", "density": 1.0},
    "dare_ties": {"divisor": "weight"},
    "della": {"divisor": "weight"},
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a round needs; attribute ``foo_bar`` is run-config key ``foo-bar``."""

    store: str = "fedmerge-store"
    task: str = "digits"
    mode: Mode = "full"
    num_rounds: int = 2
    fraction: float = 1.0
    min_clients: int = 2
    min_valid: int = 2
    round_deadline_s: float = 120.0
    wait_for_nodes_s: float = 60.0
    max_retries: int = 1
    seed: int = 0
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    local_epochs: int = 2
    lr: float = 0.1
    batch_size: int = 32
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_space: LoraSpace = "product"
    aggregator: str = "ties"
    codec_density: float = 0.1
    codec_values: str = "int8"
    codec_error_feedback: bool = True
    max_package_bytes: int = 256 << 20
    max_num_examples: int = 10_000_000
    server_eval: bool = True
    init_base: bool = True
    aggregator_params: dict[str, Any] = field(default_factory=lambda: dict(ROUND_DEFAULTS["ties"]))

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
            if f.name == "aggregator_params":
                continue
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        for key, value in self.aggregator_params.items():
            out[AGGREGATOR_PREFIX + key] = value
        return out


def _expected(f: dataclasses.Field[Any]) -> Any:
    return {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's run config into a :class:`RunConfig`; every problem reported in one ConfigError."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    agg_params: dict[str, Any] | None = None
    known = {f.name.replace("_", "-"): f for f in fields(RunConfig) if f.name != "aggregator_params"}
    for key, value in raw.items():
        if key.startswith(AGGREGATOR_PREFIX):
            agg_params = {} if agg_params is None else agg_params
            agg_params[key[len(AGGREGATOR_PREFIX) :].replace("-", "_")] = value  # kebab-case as Flower keys
            continue
        f = known.get(key)
        if f is None:
            errors.append(f"unknown key {key!r} (known: {', '.join(sorted(known))}, or 'aggregator.<param>')")
            continue
        converted = _convert(key, value, f, errors)
        if converted is not None:
            values[f.name] = converted
    # user keys override the round defaults, never silently drop them
    defaults = ROUND_DEFAULTS.get(values.get("aggregator", "ties"), {})
    values["aggregator_params"] = {**defaults, **(agg_params or {})}
    if errors:
        raise ConfigError("invalid run config: " + "; ".join(errors))
    cfg = RunConfig(**values)
    _check_ranges(cfg, errors)
    if errors:
        raise ConfigError("invalid run config: " + "; ".join(errors))
    return cfg


def _convert(key: str, value: Any, f: dataclasses.Field[Any], errors: list[str]) -> Any:
    kind = str(f.type)
    if kind.startswith("Literal") or kind in ("Mode", "LoraSpace"):
        choices = get_args(Mode) if kind == "Mode" else get_args(LoraSpace)
        if value not in choices:
            errors.append(f"{key}={value!r} must be one of {list(choices)}")
            return None
        return value
    expected = _expected(f)
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
    from fedmerge.aggregators import available

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
        (cfg.max_package_bytes >= 1, f"max-package-bytes={cfg.max_package_bytes} must be ≥ 1"),
        (cfg.max_num_examples >= 1, f"max-num-examples={cfg.max_num_examples} must be ≥ 1"),
        (
            cfg.aggregator in available(),
            f"aggregator={cfg.aggregator!r} is not registered; choose one of {sorted(available())}",
        ),
    ]
    errors.extend(msg for ok, msg in checks if not ok)
    try:
        cfg.codec()
    except ConfigError as exc:
        errors.append(f"codec-density/codec-values: {exc}")
    if not errors:
        try:
            from fedmerge.aggregators import create

            create(cfg.aggregator, **cfg.aggregator_params)
        except (ConfigError, TypeError) as exc:
            errors.append(f"aggregator.* parameters {cfg.aggregator_params}: {exc}")
