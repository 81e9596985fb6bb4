"""The fedmerge ServerApp (Flower Message API): rounds of compressed deltas merged into the model store.

``flwr run .`` loads ``server.app:app``. The run config (``[tool.flwr.app.config]``, overridable with
``--run-config``) is parsed once into :class:`fedmerge.flower.config.RunConfig`; the store at
``store`` is opened (its ``latest`` version is the base; an empty store gets the task's pre-trained
base when ``init-base`` is true) and :class:`fedmerge.flower.rounds.Federation` runs the rounds,
resuming at ``latest.round + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmerge.delta.state_dict import StateDict
from fedmerge.flower.config import RunConfig, parse_run_config
from fedmerge.flower.rounds import Federation, RoundReport, ensure_base
from fedmerge.memory import use_mmap_for_large_allocations
from fedmerge.store import ModelStore
from fedmerge_simulations.tasks import get_task


def task_evaluator(task_name: str, seed: int) -> Callable[[StateDict], dict[str, float]]:
    """Server-side evaluation: ``loss`` and ``accuracy`` of full weights on the task's global test set."""
    task = get_task(task_name)

    def evaluate(weights: StateDict) -> dict[str, float]:
        model = task.build_model(seed)
        model.load_state_dict(weights)
        result = task.evaluate(model, task.global_test_set())
        return {"accuracy": float(result["accuracy"]), "loss": float(result["loss"])}

    return evaluate


def run_server(
    grid: Grid, cfg: RunConfig, on_round: Callable[[RoundReport], None] | None = None
) -> list[RoundReport]:
    """Open the store, make sure it has a base, and run ``cfg.num_rounds`` rounds."""
    use_mmap_for_large_allocations()
    with ModelStore.open(cfg.store) as store:
        if cfg.init_base:
            ensure_base(store, lambda: get_task(cfg.task).pretrained_base(cfg.seed), name=cfg.task)
        evaluate = task_evaluator(cfg.task, cfg.seed) if cfg.server_eval else None
        return Federation(grid, cfg, store, evaluate=evaluate, on_round=on_round).run()


def _log_round(report: RoundReport) -> None:
    log(
        INFO,
        "round %d: version %s, %d accepted, %d rejected, uplink %d B (dense %d B), %s",
        report.round, report.version_id, len(report.accepted), len(report.rejected),
        report.uplink_bytes, report.uplink_dense_bytes, report.metrics,
    )  # fmt: skip
    for o in report.rejected:
        log(WARNING, "round %d: %s rejected: %s", report.round, o.client_id, o.reason)


def make_server_app(
    overrides: Mapping[str, Any] | None = None, on_round: Callable[[RoundReport], None] | None = None
) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = parse_run_config({**dict(context.run_config), **dict(overrides or {})})
        run_server(grid, cfg, on_round or _log_round)

    return server


app = make_server_app()
