"""Every aggregator parameter can be set with ``flwr run --run-config`` (Flower refuses undeclared keys),
and an undeclared ("") key leaves the aggregator's own round default in place."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmerge.errors import ConfigError
from fedmerge.flower.config import AGGREGATOR_PREFIX, UNSET, aggregator_param_names, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def declared() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_aggregator_parameter_unset() -> None:
    config = declared()
    keys = sorted(k[len(AGGREGATOR_PREFIX) :] for k in config if k.startswith(AGGREGATOR_PREFIX))
    assert keys == aggregator_param_names()
    assert all(config[AGGREGATOR_PREFIX + k] == UNSET for k in keys)


def test_declared_config_parses_and_keeps_round_defaults() -> None:
    cfg = parse_run_config(declared())
    assert cfg.aggregation.name == "ties"
    assert cfg.aggregation.params == {"divisor": "weight", "density": 1.0}  # Ties.round_defaults


@pytest.mark.parametrize("aggregator", ["fedavg", "ties", "dare_ties", "magmax", "median", "norm_bounded"])
def test_switching_aggregator_with_every_key_declared(aggregator: str) -> None:
    cfg = parse_run_config({**declared(), "aggregator": aggregator})
    assert cfg.aggregation.name == aggregator


def test_override_reaches_the_aggregator() -> None:
    cfg = parse_run_config({**declared(), "aggregator.scaling": 0.5})
    assert cfg.aggregation.params == {"divisor": "weight", "density": 1.0, "scaling": 0.5}


def test_round_owned_parameters_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"aggregator\.seed is set by the round"):
        parse_run_config({"aggregator.seed": 3})
