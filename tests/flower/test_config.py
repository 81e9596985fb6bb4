"""The run config is parsed once; every problem is reported together."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedmerge.errors import ConfigError
from fedmerge.flower.config import RunConfig, parse_run_config, run_config_keys
from fedmerge.flower.settings import AggregationSettings, BulkSettings


def test_defaults_are_ties_over_topk_int8_with_weighted_mean() -> None:
    cfg = parse_run_config({})
    assert cfg.aggregation.name == "ties"
    assert cfg.aggregation.params == {"divisor": "weight", "density": 1.0}
    codec = cfg.codec.config()
    assert (codec.sparsify, codec.density, codec.values) == ("topk", 0.1, "int8")


def test_values_and_aggregator_params_are_read() -> None:
    cfg = parse_run_config(
        {"num-rounds": 4, "lr": 1, "aggregator": "fedavg", "mode": "lora", "store": "/tmp/x"}
    )
    assert (cfg.num_rounds, cfg.lr, cfg.training.mode, cfg.store) == (4, 1.0, "lora", "/tmp/x")
    assert isinstance(cfg.lr, float)
    assert cfg.aggregation.params == {}  # ties defaults do not leak into another aggregator
    cfg = parse_run_config(
        {"aggregator": "ties", "aggregator.density": 0.5, "aggregator.sign-election": "frequency"}
    )
    # a user key overrides its round default; the other defaults stay (divisor=weight matters with
    # example-count weights), and kebab-case keys map to the aggregator's parameter names
    assert cfg.aggregation.params == {"divisor": "weight", "density": 0.5, "sign_election": "frequency"}
    cfg = parse_run_config({"aggregator": "dare_ties", "aggregator.density": 0.3})
    assert cfg.aggregation.params == {"divisor": "weight", "density": 0.3}


def test_all_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config({"num-rounds": "two", "num-round": 1, "mode": "half", "fraction": True})
    message = str(info.value)
    for needle in ("num-rounds='two'", "'num-round'", "mode='half'", "fraction=True"):
        assert needle in message
    assert "known:" not in message and "store" not in message  # never the whole key list


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("num-round", "num-rounds"), ("batch_size", "batch-size"), ("Local-Epochs", "local-epochs"),
     ("fraction-eval", "fraction-evaluate"), ("num-server-round", "num-server-rounds")],
)  # fmt: skip
def test_a_near_miss_of_a_known_key_is_one_error_naming_the_suggestion(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: 1})
    assert str(info.value) == f"invalid run config: unknown key {key!r}: did you mean {suggestion!r}?"


def test_an_apps_own_keys_pass_through_to_the_clients_and_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fedmerge.flower.server.federation import train_config
    from fedmerge.store import Version

    own = {"learning-rate-decay": 0.5, "use-wandb": False, "model-name": "tiny", "min-available-nodes": 3}
    with caplog.at_level("INFO", logger="fedmerge.config"):
        cfg = parse_run_config({**own, "num-rounds": 2})
        again = parse_run_config(own)
    assert cfg.extra == own and again.extra == own
    lines = [r.getMessage() for r in caplog.records if "passed to the clients" in r.getMessage()]
    assert len(lines) <= 1  # once per process (an earlier test may have logged them already)
    assert parse_run_config(cfg.to_flower()) == cfg
    base = Version.__new__(Version)
    record = train_config(cfg, 1, base)
    assert {k: record[k] for k in own} == own
    assert record["server-round"] == 1 and record["lr"] == cfg.lr


def test_flower_template_names_mean_fedmerges_keys() -> None:
    cfg = parse_run_config(
        {"num-server-rounds": 5, "fraction-train": 0.5, "min-train-nodes": 3, "fraction-evaluate": 0.25,
         "min-evaluate-nodes": 1}
    )  # fmt: skip
    assert (cfg.num_rounds, cfg.rounds.fraction, cfg.rounds.min_clients) == (5, 0.5, 3)
    assert (cfg.evaluation.fraction_evaluate, cfg.evaluation.min_evaluate_nodes) == (0.25, 1)
    assert cfg.extra == {}
    assert parse_run_config({"num-server-rounds": 4, "num-rounds": 4}).num_rounds == 4
    with pytest.raises(ConfigError) as info:
        parse_run_config({"num-rounds": 2, "num-server-rounds": 3})
    assert (
        str(info.value)
        == "invalid run config: num-rounds=2 and num-server-rounds=3 set the same thing; keep one"
    )
    with pytest.raises(ConfigError, match=r"fraction=2.0 must be in \(0, 1\]"):
        parse_run_config({"fraction-fit": 2.0})


def test_ranges_and_aggregator_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config({"num-rounds": 0, "fraction": 1.5, "aggregator": "nope", "min-valid": 9})
    message = str(info.value)
    assert "num-rounds=0" in message and "fraction=1.5" in message
    assert "'nope'" in message and "min-valid=9" in message
    with pytest.raises(ConfigError, match="does not take"):
        parse_run_config({"aggregator": "ties", "aggregator.gamma": 1.0})
    with pytest.raises(ConfigError, match="codec"):
        parse_run_config({"codec-values": "int3"})


def test_round_trip_through_flower_keys() -> None:
    cfg = RunConfig(
        num_rounds=3,
        aggregation=AggregationSettings(params={"divisor": "count", "density": 0.5}),
        bulk=BulkSettings(threshold_bytes=7),
    )
    flower = cfg.to_flower()
    assert (flower["num-rounds"], flower["bulk-threshold-bytes"], flower["aggregator"]) == (3, 7, "ties")
    assert (flower["aggregator.divisor"], flower["tracking"], flower["server-optimizer"]) == (
        "count",
        "",
        "none",
    )
    assert parse_run_config(flower) == cfg


RUN_CONFIG_KEYS = [
    "aggregator",
    "batch-size",
    "bulk-address",
    "bulk-allow-insecure",
    "bulk-downlink",
    "bulk-public-address",
    "bulk-spool-dir",
    "bulk-spool-reserve-bytes",
    "bulk-threshold-bytes",
    "bulk-tls-cert",
    "bulk-tls-client-ca",
    "bulk-tls-key",
    "catalog",
    "client-device",
    "client-test-metrics",
    "codec-deflate",
    "codec-density",
    "codec-error-feedback",
    "codec-rank",
    "codec-values",
    "dirichlet-alpha",
    "downlink-base-at-nodes",
    "downlink-deflate",
    "downlink-density",
    "downlink-rank",
    "downlink-values",
    "dp-allow-any-aggregator",
    "dp-clip-norm",
    "dp-delta",
    "dp-mode",
    "dp-noise-multiplier",
    "dp-noise-seed",
    "evaluate-every",
    "fault-dropout",
    "fault-straggler",
    "fault-straggler-delay-s",
    "fisher-examples",
    "fraction",
    "fraction-evaluate",
    "init-base",
    "local-epochs",
    "lora-alpha",
    "lora-rank",
    "lora-space",
    "lr",
    "max-num-examples",
    "max-package-bytes",
    "max-retries",
    "min-clients",
    "min-evaluate-nodes",
    "min-valid",
    "mode",
    "num-rounds",
    "partitioner",
    "reject-anomalies",
    "reject-min-cosine",
    "round-deadline-s",
    "seed",
    "server-beta1",
    "server-beta2",
    "server-eval",
    "server-lr",
    "server-momentum",
    "server-optimizer",
    "server-tau",
    "store",
    "task",
    "tracking",
    "tracking-dir",
    "wait-for-nodes-s",
]


def test_every_key_is_declared_once_in_its_group() -> None:
    keys = run_config_keys()
    assert sorted(keys) == RUN_CONFIG_KEYS
    assert sorted(k for k in RunConfig().to_flower() if not k.startswith("aggregator.")) == RUN_CONFIG_KEYS
    homes = {key: (group, f.name) for key, (group, f) in keys.items()}
    assert homes["bulk-threshold-bytes"] == ("bulk", "threshold_bytes")
    assert homes["aggregator"] == ("aggregation", "name") and homes["tracking"] == ("tracker", "backend")
    assert homes["dp-clip-norm"] == ("dp", "clip_norm") and homes["num-rounds"] == (None, "num_rounds")
    cfg = parse_run_config(
        {"bulk-threshold-bytes": 5, "dp-clip-norm": 1.0, "aggregator": "fedavg", "reject-min-cosine": 0.5,
         "tracking": "tensorboard", "server-lr": 0.5}
    )  # fmt: skip
    assert (cfg.bulk.threshold_bytes, cfg.dp.clip_norm, cfg.aggregation.name) == (5, 1.0, "fedavg")
    assert (cfg.screen.min_cosine, cfg.tracker.backend, cfg.server_opt.lr) == (0.5, "tensorboard", 0.5)
    dp = cfg.dp.config()
    assert dp is not None and dp.clip_norm == 1.0


def test_pyproject_declares_every_run_config_key() -> None:
    # `flwr run --run-config` refuses keys missing from [tool.flwr.app.config] (flwr.common.config.fuse_dicts)
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]
    config = declared["app"]["config"]
    keys = set(run_config_keys())
    assert sorted(keys - set(config)) == []
    assert parse_run_config(config).to_flower().items() >= {k: config[k] for k in keys}.items()


def test_rounds_carry_a_fisher_and_refuse_any_other_side_input() -> None:
    from fedmerge.aggregators import available, get
    from fedmerge.flower.config import _check_side_inputs

    assert [name for name in available() if get(name).side_inputs] == ["fisher"]
    for name in available():  # every registered method is usable in rounds
        parse_run_config({"aggregator": name})
    errors: list[str] = []
    _check_side_inputs(parse_run_config({}), ("hessian",), errors)
    assert len(errors) == 1 and "needs each client's hessian beside its delta" in errors[0]


def test_a_store_path_without_a_store_is_one_error_naming_the_path_and_fedmerge_init(tmp_path: Path) -> None:
    from fedmerge.store import ModelStore
    from fedmerge_server.app import MissingStore, run_server

    missing = tmp_path / "stor32"
    cfg = parse_run_config({"store": str(missing), "init-base": False, "server-eval": False})
    with pytest.raises(MissingStore) as info:
        run_server(None, cfg)  # type: ignore[arg-type]  # refused before any message is sent
    message = str(info.value)
    assert f"store {str(missing)!r} does not exist" in message and "fedmerge init --store" in message
    assert not missing.exists()  # nothing created silently
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(MissingStore, match="is not a fedmerge store"):
        run_server(None, replace(cfg, store=str(tmp_path / "other")))  # type: ignore[arg-type]
    ModelStore.open(tmp_path / "empty").close()
    with pytest.raises(MissingStore, match="holds no version yet; create its base with `fedmerge init"):
        run_server(None, replace(cfg, store=str(tmp_path / "empty")))  # type: ignore[arg-type]


def test_the_server_app_raises_when_its_run_fails(tmp_path: Path) -> None:
    """Flower's ServerApp runtime marks the run ``finished:failed`` and exits non-zero when ``main``
    raises: the failure must propagate out of the app, not be logged and swallowed."""
    from flwr.app import Context, RecordDict

    from fedmerge_server.app import MissingStore, make_server_app

    app = make_server_app({"store": str(tmp_path / "nowhere"), "init-base": False, "server-eval": False})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(MissingStore):
        app(None, context)  # type: ignore[arg-type]
