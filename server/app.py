"""The fedmerge ServerApp (Flower Message API): rounds of compressed deltas merged into the model store.

``flwr run .`` loads ``server.app:app``. The run config (``[tool.flwr.app.config]``, overridable with
``--run-config``) is parsed once into :class:`fedmerge.flower.config.RunConfig`; the store at
``store`` is opened (its ``latest`` version is the base; only a built-in task with a pre-trained
base and ``init-base = true`` creates the store, any other missing store is a :class:`MissingStore`
naming the path and ``fedmerge init``) and :class:`fedmerge.flower.server.federation.Federation` runs
the rounds, resuming at ``latest.round + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError
from fedmerge.flower.config import RunConfig, parse_run_config
from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.federation import Federation, ensure_base
from fedmerge.memory import use_mmap_for_large_allocations
from fedmerge.metrics import RoundEventLog
from fedmerge.store import ModelStore, UnknownVersionError
from fedmerge.store.model_store import STORE_MARKER
from fedmerge.store.s3_client import is_s3_url
from fedmerge.tasks import Task, get_task
from fedmerge.tasks.evaluate import task_evaluator
from fedmerge.tracking import MetricsSink, open_sink


class BaseMismatch(ConfigError):
    """The task's model and the store's base differ in tensor names, shapes or dtypes."""


class MissingStore(ConfigError):
    """The run config's ``store`` is not a store with a base version (and the run will not make one)."""


def check_store_exists(cfg: RunConfig) -> None:
    """Refuse (one :class:`MissingStore`) a ``store`` path that holds no fedmerge store: rounds never
    create an empty store, only the built-in tasks' pre-trained base with ``init-base = true``."""
    if is_s3_url(cfg.store):  # ModelStore.open checks the bucket; an empty one is a MissingStore below
        return
    path = Path(cfg.store)
    if (path / STORE_MARKER).is_file():
        return
    what = "does not exist" if not path.exists() else f"is not a fedmerge store (no {STORE_MARKER})"
    raise MissingStore(
        f"store {cfg.store!r} {what} (absolute: {path.resolve()}); check the 'store' key, or create "
        f"the store from your model with `fedmerge init --store {cfg.store} --base <model-dir>`"
    )


def check_base_matches_task(
    task: Task, task_name: str, weights: StateDict, version_id: str, seed: int
) -> None:
    """Refuse (one :class:`BaseMismatch`) unless ``task.build_model(seed)``'s state dict has exactly
    the base's tensor names, shapes and dtypes: checked before the first round, so no client trains
    on a base the server could not load."""
    model = {k: v for k, v in task.build_model(seed).state_dict().items()}
    problems: list[str] = []
    for name in sorted(set(model) & set(weights)):
        m, b = model[name], weights[name]
        if tuple(m.shape) != tuple(b.shape):
            problems.append(f"{name!r} has shape {tuple(m.shape)} in the model, {tuple(b.shape)} in the base")
        elif m.dtype != b.dtype:
            problems.append(f"{name!r} is {m.dtype} in the model, {b.dtype} in the base")
    problems += [f"{n!r} is in the base but not in the model" for n in sorted(set(weights) - set(model))]
    problems += [f"{n!r} is in the model but not in the base" for n in sorted(set(model) - set(weights))]
    if problems:
        raise BaseMismatch(
            f"task {task_name!r} does not match the store's base {version_id} ({len(problems)} "
            f"difference(s)): {'; '.join(problems[:3])}{' …' if len(problems) > 3 else ''}; use the "
            "task whose model the base was made from, or initialise the store from this task's model"
        )


def server_task(cfg: RunConfig) -> Task | None:
    """The run's task on the server, or None for ``task = ""``: then the store's base is the model and
    the ClientApps bring their own (e.g. Flower's quickstart apps), so nothing of the task is imported
    here; that needs ``server-eval = false`` (one ConfigError otherwise) and a store with a base."""
    if cfg.task:
        return get_task(cfg.task)
    if cfg.server_eval:
        raise ConfigError(
            "task = '' (no task on the server) cannot evaluate on the server; set server-eval=false, "
            "or name the task whose global test set evaluates the model"
        )
    return None


def run_server(
    grid: Grid, cfg: RunConfig, on_round: Callable[[RoundReport], None] | None = None
) -> list[RoundReport]:
    """Open the store, make sure it has a base, check the task's model against it, and run
    ``cfg.num_rounds`` rounds. Every configuration error is raised before any message is sent."""
    use_mmap_for_large_allocations()
    task = server_task(cfg)
    evaluate = task_evaluator(cfg.task, cfg.seed) if cfg.server_eval else None
    makes_base = (
        task is not None and cfg.rounds.init_base and callable(getattr(task, "pretrained_base", None))
    )
    if not makes_base:
        check_store_exists(cfg)
    with ModelStore.open(cfg.store, catalog=cfg.catalog or None) as store:
        if makes_base and task is not None:
            pretrained = task.pretrained_base
            ensure_base(store, lambda: pretrained(cfg.seed), name=cfg.task)
        try:
            base = store.get("latest")
        except UnknownVersionError:
            raise MissingStore(
                f"store {cfg.store!r} holds no version yet; create its base with "
                f"`fedmerge init --store {cfg.store} --base <model-dir>`"
            ) from None
        if callable(getattr(task, "use_store_files", None)):  # e.g. hf_causal_lm: config.json kept by init
            task.use_store_files(store.read_files(base))  # type: ignore[union-attr]
        weights = store.materialize(base)
        if task is not None:
            check_base_matches_task(task, cfg.task, weights, base.id, cfg.seed)
        federation = Federation(grid, cfg, store, evaluate=evaluate, on_round=on_round)
        federation.latest_weights = (base.id, weights)
        return federation.run()


def _log_round(report: RoundReport) -> None:
    log(
        INFO,
        "round %d: version %s, %d accepted, %d rejected, uplink %d B (dense %d B), %s",
        report.round, report.version_id, len(report.accepted), len(report.rejected),
        report.uplink_bytes, report.uplink_dense_bytes, report.metrics,
    )  # fmt: skip
    for o in report.rejected:
        log(WARNING, "round %d: %s rejected: %s", report.round, o.client_id, o.reason)


def with_metrics_events(on_round: Callable[[RoundReport], None]) -> Callable[[RoundReport], None]:
    """``on_round``, then (when ``fedmerge serve --metrics-port`` set :data:`fedmerge.metrics.EVENTS_ENV`)
    one line per round appended to its events file, for the serve process's metrics endpoint. A
    failure to write the line is logged, never fatal to the round."""
    events = RoundEventLog.from_env()
    if events is None:
        return on_round

    def both(report: RoundReport) -> None:
        on_round(report)
        try:
            events(report)
        except OSError as exc:
            log(WARNING, "round %d: metrics event not written to %s: %s", report.round, events.path, exc)

    return both


def tracking_dir(cfg: RunConfig) -> Path | None:
    """Where tracking writes: ``tracking-dir``, else ``<store>.tracking`` beside the store for
    TensorBoard (None for MLflow: its own configuration decides)."""
    if cfg.tracker.dir:
        return Path(cfg.tracker.dir)
    if cfg.tracker.backend == "tensorboard":
        store = Path(store_name(cfg)).resolve()
        return store.with_name(store.name + ".tracking")
    return None


def store_name(cfg: RunConfig) -> str:
    """The store's local name for files kept beside it: its directory, or for ``s3://bucket/prefix``
    ``bucket-prefix`` in the working directory (the bucket holds only the store's own objects)."""
    if is_s3_url(cfg.store):
        return cfg.store.removeprefix("s3://").strip("/").replace("/", "-")
    return cfg.store


def tracking_sink(cfg: RunConfig) -> MetricsSink | None:
    """The run's tracking sink (``tracking`` / ``tracking-dir`` keys), None when tracking is off."""
    return open_sink(cfg.tracker.backend, tracking_dir(cfg), run_name=Path(store_name(cfg)).name)


def with_tracking(
    on_round: Callable[[RoundReport], None], sink: MetricsSink | None
) -> Callable[[RoundReport], None]:
    """``on_round``, then the committed round's store metrics (``report.metrics``, exactly what the
    version's manifest records) logged to ``sink`` at step = the round."""
    if sink is None:
        return on_round

    def both(report: RoundReport) -> None:
        on_round(report)
        if report.version_id is not None:
            sink.log_round(report.round, report.metrics)

    return both


def make_server_app(
    overrides: Mapping[str, Any] | None = None, on_round: Callable[[RoundReport], None] | None = None
) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = parse_run_config({**dict(context.run_config), **dict(overrides or {})})
        sink = tracking_sink(cfg)
        try:
            run_server(grid, cfg, with_tracking(with_metrics_events(on_round or _log_round), sink))
        finally:
            if sink is not None:
                sink.close()

    return server


app = make_server_app()
