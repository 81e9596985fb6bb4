"""The pieces of ``run_simulation_app`` that need no simulation: the app directory's pyproject, the report
channel, argument checks and the one-line failure reason (the runs themselves: test_simulation.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmerge.errors import ConfigError
from fedmerge.flower.simulation import (
    REPORTS_ENV,
    _app_pyproject,
    _ReportReader,
    emit_report,
    failure_line,
    run_simulation_app,
    superlink_env,
)


def test_the_run_config_becomes_the_apps_config_with_its_types() -> None:
    config = {"store": "/tmp/a b/'q\"", "num-rounds": 3, "lr": 0.05, "server-eval": True, "aggregator.k": "x"}
    text = _app_pyproject("m.server:app", "m.client:app", config)
    parsed = tomllib.loads(text)
    assert parsed["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "m.server:app",
        "clientapp": "m.client:app",
    }
    assert parsed["tool"]["flwr"]["app"]["config"] == config


def test_a_run_config_value_toml_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"run config 'seeds': list is not a bool, number or string"):
        _app_pyproject("a:b", "c:d", {"seeds": [1, 2]})


def test_reports_come_back_in_order_and_a_partial_frame_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "reports.bin"
    monkeypatch.setenv(REPORTS_ENV, str(path))
    got: list[object] = []
    reader = _ReportReader(path, got.append)
    reader.poll()  # no file yet
    emit_report({"round": 1})
    emit_report(("round", lambda: 2))  # closures too (cloudpickle)
    with open(path, "ab") as f:
        f.write((1000).to_bytes(8, "little") + b"partial")  # a frame still being written
    reader.poll()
    assert got[0] == {"round": 1} and got[1][0] == "round" and got[1][1]() == 2  # type: ignore[index]
    assert len(got) == 2
    monkeypatch.delenv(REPORTS_ENV)
    emit_report("nowhere")  # outside a simulation: a no-op


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_supernodes": 0}, "num_supernodes must be at least 1"),
        ({"num_supernodes": 2, "num_cpus": 1.5}, "num_cpus per client must be a whole number"),
        ({"num_supernodes": 2, "num_gpus": -0.5}, "num_gpus per client must be"),
        ({"num_supernodes": 2, "ray_address": "127.0.0.1:6379", "ray_num_cpus": 2}, "existing cluster"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_simulation_app("a:b", "c:d", **kwargs)  # type: ignore[arg-type]


def test_a_component_reference_must_name_its_attribute() -> None:
    with pytest.raises(ConfigError, match="must be 'module:attribute'"):
        run_simulation_app("fedmerge_server.app", "c:d", num_supernodes=1)


def test_the_failure_line_names_the_exception_and_its_first_cause() -> None:
    log = (
        "Traceback (most recent call last):\n  File 'x'\n"
        "fedmerge.errors.ConfigError: invalid run config: aggregator='nosuch' is not registered\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 700\n"
    )
    assert failure_line(log) == (
        "simulation failed: fedmerge.errors.ConfigError: "
        "invalid run config: aggregator='nosuch' is not registered"
    )
    chained = (
        "Exception: The current node timed out during startup.\n\nRuntimeError: Simulation Runtime crashed.\n"
    )
    assert failure_line(chained) == (
        "simulation failed: RuntimeError: Simulation Runtime crashed. "
        "(first: Exception: The current node timed out during startup.)"
    )
    assert failure_line("no exception here") == "simulation failed (see its log below)"


def test_the_superlink_finds_this_installations_flower_commands_without_an_activated_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import shutil
    import sys

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as when the venv's python is run without `activate`
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    env = superlink_env(tmp_path / "home", tmp_path / "reports.bin", {"EXTRA": "1"})
    bin_dir = str(Path(sys.executable).parent)
    assert env["PATH"].split(os.pathsep)[0] == bin_dir
    for command in ("flower-superexec", "flwr-simulation"):  # what the SuperLink starts by name
        assert shutil.which(command, path=env["PATH"]) == str(Path(bin_dir) / command)
    assert "RAY_ADDRESS" not in env and env["EXTRA"] == "1" and env["FLWR_HOME"] == str(tmp_path / "home")
    assert (
        superlink_env(tmp_path, tmp_path / "r", ray_address="127.0.0.1:6380")["RAY_ADDRESS"]
        == "127.0.0.1:6380"
    )
