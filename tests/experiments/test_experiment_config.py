from __future__ import annotations

import pytest

from fedmerge.errors import ConfigError
from fedmerge_simulations.experiment import DEFAULT_CONFIG, load_config, parse_config


def test_default_config_expands_into_one_trial_per_aggregator_codec_and_seed() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    trials = cfg.trials()
    assert len(trials) == len(cfg.aggregators) * len(cfg.codecs) * len(cfg.seeds)
    assert len({t.key for t in trials}) == len(trials)
    assert {"fedavg", "ties", "dare_ties"} <= {t.aggregator.name for t in trials}


def test_trial_key_changes_with_anything_that_changes_the_result() -> None:
    base = parse_config({"name": "a", "aggregators": [{"name": "ties", "params": {"density": 0.2}}]})
    other = parse_config({"name": "b", "aggregators": [{"name": "ties", "params": {"density": 0.3}}]})
    renamed = parse_config({"name": "c", "aggregators": [{"name": "ties", "params": {"density": 0.2}}]})
    assert base.trials()[0].key != other.trials()[0].key
    assert base.trials()[0].key == renamed.trials()[0].key  # the experiment's name is not a parameter


def test_every_problem_is_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "clients": 0,
                "fraction": 1.5,
                "partitioner": {"name": "zipf"},
                "device": "tpu",
                "aggregators": [{"name": "tiez"}],
                "codecs": [{"density": 0, "quantization": "int3"}],
                "surprise": 1,
            }
        )
    message = str(err.value)
    fragments = ("clients", "fraction", "partitioner.name", "device", "tiez", "density", "int3", "surprise")
    for fragment in fragments:
        assert fragment in message
    assert "8 problem(s)" in message


def test_cuda_needs_a_gpu_fraction(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.toml"
    path.write_text('device = "cuda"\n')
    with pytest.raises(ConfigError, match="gpu_fraction"):
        load_config(path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        path.write_text("device = \n")
        load_config(path)
