"""Run an experiment: every (aggregator, codec, seed) trial as a federation on Flower's simulation engine.

Each trial runs the fedmerge ServerApp and ClientApp on Flower's simulation runtime
(:func:`fedmerge.flower.simulation.run_simulation_app`: ``flwr run`` on a private SuperLink in
simulation mode, the run config in the app's ``[tool.flwr.app.config]``) from a fresh process (Ray is
started and stopped per trial unless ``ray_address`` names a cluster, and a crash or leak in one trial
cannot touch another) with its own model store under ``OUT/stores/``. A finished trial writes
``OUT/trials/KEY.json``; running the same experiment again skips it (resumable), and the report is
rebuilt from all trial files. Progress is shown with a rich progress bar.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app
from fedmerge_simulations.experiment import AggregatorSpec, CodecSpec, ExperimentConfig, Trial, parse_config
from fedmerge_simulations.report import Result, write_report

CLIENT_APP = "fedmerge_clients.app:app"
SERVER_APP_FACTORY = "fedmerge_server.app:make_server_app"
"""The apps a trial runs, by import string as Flower names them (an application imports no other)."""


class TrialFailed(FedMergeError, RuntimeError):
    """A trial's simulation exited with an error; its output is attached."""


def run_config(trial: Trial, store: Path) -> dict[str, Any]:
    """The fedmerge run config (``[tool.flwr.app.config]`` keys) of one trial."""
    exp = trial.experiment
    sampled = max(1, round(exp.fraction * exp.clients))
    config: dict[str, Any] = {
        "store": str(store),
        "task": exp.task,
        "mode": exp.mode,
        "num-rounds": exp.rounds,
        "fraction": exp.fraction,
        "min-clients": sampled,
        "min-valid": max(1, sampled // 2),
        "seed": trial.seed,
        "partitioner": exp.partitioner["name"],
        "local-epochs": exp.local_epochs,
        "lr": exp.lr,
        "aggregator": trial.aggregator.name,
        "codec-density": trial.codec.density,
        "codec-values": trial.codec.quantization,
        "codec-error-feedback": trial.codec.error_feedback,
        "client-device": exp.device,  # "cuda": each virtual client trains on its GPU fraction
    }
    if "alpha" in exp.partitioner:
        config["dirichlet-alpha"] = float(exp.partitioner["alpha"])
    if exp.dropout:
        config["fault-dropout"] = exp.dropout
    if exp.stragglers:
        config["fault-straggler"] = exp.stragglers
    for key, value in trial.aggregator.params.items():
        config[f"aggregator.{key}"] = value
    if exp.tracking:  # TensorBoard: one run directory per trial; MLflow: one run named by the trial
        config["tracking"] = exp.tracking
        where = Path(exp.tracking_dir) if exp.tracking_dir else None
        if where is not None and exp.tracking == "tensorboard":
            where = where / trial.key
        config["tracking-dir"] = str(where) if where is not None else ""
    return config


def execute_trial(trial: Trial, store: Path, ray_address: str | None = None) -> Result:
    """Run one trial from this process and return its result (called in the child process).

    ``ray_address``: run the trial's ClientApps on that existing Ray cluster."""
    from fedmerge.flower.server.commit import RoundReport

    reports: list[RoundReport] = []
    exp = trial.experiment
    num_gpus = exp.gpu_fraction if exp.device == "cuda" else 0.0
    if exp.cpus_per_client != int(exp.cpus_per_client):
        raise ConfigError(f"cpus_per_client must be a whole number (Flower's), got {exp.cpus_per_client}")
    t0 = time.perf_counter()
    run_simulation_app(
        ServerAppFactory(SERVER_APP_FACTORY),
        CLIENT_APP,
        num_supernodes=exp.clients,
        run_config=run_config(trial, store),
        num_cpus=int(exp.cpus_per_client),
        num_gpus=num_gpus,
        ray_address=ray_address,
        on_report=reports.append,
    )
    rounds = [
        {
            "round": r.round,
            "version": r.version_id,
            "accuracy": r.metrics.get("server-accuracy", float("nan")),
            "loss": r.metrics.get("server-loss", float("nan")),
            "bytes_sent": r.uplink_bytes,
            "dense_bytes": r.uplink_dense_bytes,
            "downlink_bytes": r.downlink_bytes,
            "wall_s": r.wall_s,
            "accepted": len(r.accepted),
            "rejected": len(r.rejected),
            "client_accuracy": [
                o.metrics["test-accuracy"] for o in r.accepted if "test-accuracy" in o.metrics
            ],
        }
        for r in reports
        if r.version_id is not None
    ]
    return {
        "key": trial.key,
        "aggregator": trial.aggregator.display,
        "codec": trial.codec.name,
        "seed": trial.seed,
        "wall_s": time.perf_counter() - t0,
        "rounds": rounds,
    }


def _trial_payload(trial: Trial) -> str:
    exp = asdict(trial.experiment)
    exp["partitioner"] = dict(trial.experiment.partitioner)
    exp["faults"] = {"dropout": exp.pop("dropout"), "stragglers": exp.pop("stragglers")}
    exp["aggregators"] = [asdict(trial.aggregator)]
    exp["codecs"] = [asdict(trial.codec)]
    exp["seeds"] = [trial.seed]
    return json.dumps(exp)


def run_trial_subprocess(trial: Trial, out: Path, ray_address: str | None = None) -> Result:
    """Run ``trial`` in a fresh Python process; its store lives under ``out/stores/KEY``."""
    store = out / "stores" / trial.key
    shutil.rmtree(store, ignore_errors=True)  # an interrupted trial starts over from its base
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    env.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedmerge_simulations.runner", _trial_payload(trial), str(store)]
        + ([ray_address] if ray_address else []),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"key"')]
    if proc.returncode != 0 or not lines:
        raise TrialFailed(f"trial {trial.key} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(json.loads(lines[-1]))


def run_experiment(
    config: ExperimentConfig, out: Path, console: Console | None = None, ray_address: str | None = None
) -> Path:
    """Run every trial not already finished in ``out/trials``, then write the report; returns summary.md.

    ``ray_address``: every trial's ClientApps run on that existing Ray cluster (``ray start --head``;
    ``auto`` finds the local one) instead of a Ray instance started per trial.

    With ``tracking`` set, each trial's ServerApp logs every committed round's store metrics
    (TensorBoard: under ``tracking_dir/KEY``, default ``out/tracking/KEY``; trials already finished are
    not run, so not logged again)."""
    console = console or Console()
    if config.tracking and not config.tracking_dir and config.tracking == "tensorboard":
        config = replace(config, tracking_dir=str((out / "tracking").resolve()))
    trials_dir = out / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    trials = config.trials()
    todo = [t for t in trials if not (trials_dir / f"{t.key}.json").exists()]
    if len(todo) < len(trials):
        console.print(
            f"resuming: {len(trials) - len(todo)} of {len(trials)} trials already finished in {trials_dir}"
        )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(config.name, total=len(trials), completed=len(trials) - len(todo))
        for trial in todo:
            progress.update(
                bar,
                description=f"{trial.aggregator.display} / {trial.codec.name} / seed {trial.seed}",
            )
            result = run_trial_subprocess(trial, out, ray_address)
            tmp = trials_dir / f".{trial.key}.json.tmp"
            tmp.write_text(json.dumps(result))
            tmp.replace(trials_dir / f"{trial.key}.json")  # a trial file is whole or absent
            progress.advance(bar)
    results = [json.loads((trials_dir / f"{t.key}.json").read_text()) for t in trials]
    baseline = _base_accuracy(config)
    return write_report(
        results,
        out,
        title=f"{config.name}: {config.task}, {config.clients} clients, "
        f"{config.rounds} rounds, partitioner {config.partitioner}",
        baseline=baseline,
    )


def _base_accuracy(config: ExperimentConfig) -> float | None:
    from fedmerge.tasks.evaluate import task_evaluator
    from fedmerge_simulations.tasks import get_task

    seed = config.seeds[0]
    return task_evaluator(config.task, seed)(get_task(config.task).pretrained_base(seed))["accuracy"]


def main(argv: list[str]) -> int:
    """Child entry point: ``python -m simulations.runner TRIAL_JSON STORE [RAY_ADDRESS]`` prints the
    trial's result."""
    raw = json.loads(argv[0])
    config = parse_config(raw, source="trial")
    (trial,) = config.trials()
    assert isinstance(trial.aggregator, AggregatorSpec) and isinstance(trial.codec, CodecSpec)
    print(json.dumps(execute_trial(trial, Path(argv[1]), argv[2] if len(argv) > 2 else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
