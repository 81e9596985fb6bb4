"""Experiment tracking: each committed round's metrics written to TensorBoard or MLflow.

A :class:`MetricsSink` receives, for every round that committed a version, exactly the figures the
store records as that version's ``metrics`` (``round_metrics`` of the round engine plus the
``server-*`` evaluation: ``accepted``, ``rejected``, ``uplink-bytes``, ``uplink-dense-bytes``,
``downlink-bytes``, ``clients-*`` weighted means, ``server-accuracy``, ``server-loss``, …), at step =
the round number. Chosen by the run-config keys ``tracking`` (``""`` = off, ``"tensorboard"``,
``"mlflow"``) and ``tracking-dir`` (``fedmerge simulate``: ``tracking`` / ``tracking_dir`` in the
TOML recipe); :func:`open_sink` builds it.

* TensorBoard (:class:`TensorBoardSink`): ``torch.utils.tensorboard.SummaryWriter`` writing event
  files under the directory, one scalar per key (tag = the metric's name). Needs the extra
  ``pip install 'fedmerge[tracking]'``.
* MLflow (:class:`MLflowSink`): ``mlflow.start_run`` then ``mlflow.log_metrics(values, step=round)``
  and ``mlflow.end_run`` at :meth:`~MetricsSink.close`; with a directory, the tracking URI is that
  directory as a ``file:`` URI, otherwise MLflow's own configuration (``MLFLOW_TRACKING_URI``)
  applies. Used only when ``mlflow`` is importable (installed by the user, not by an extra).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedmerge.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow")


class TrackingUnavailable(ConfigError):
    """The tracking backend that was asked for is not installed."""


class MetricsSink(Protocol):
    """Where per-round metrics go. ``log_round`` may be called once per round; ``close`` flushes."""

    def log_round(self, round_: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def finite_values(values: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``values`` that are finite numbers, as floats (NaN/inf and non-numbers dropped)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


class TensorBoardSink:
    """One TensorBoard run in ``directory``: scalar ``key`` at step ``round_`` for every value."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingUnavailable(
                "tracking='tensorboard' needs TensorBoard: pip install 'fedmerge[tracking]'"
            ) from None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=str(self.directory))

    def log_round(self, round_: int, values: Mapping[str, float]) -> None:
        for key, value in sorted(finite_values(values).items()):
            self._writer.add_scalar(key, value, global_step=int(round_))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MLflowSink:
    """One MLflow run (``run_name``; experiment ``experiment`` when given), metrics at step = round."""

    def __init__(
        self, directory: str | Path | None = None, run_name: str | None = None, experiment: str | None = None
    ) -> None:
        try:
            import mlflow  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise TrackingUnavailable(
                "tracking='mlflow' needs MLflow, which fedmerge does not install: pip install mlflow "
                "(or use tracking='tensorboard' with pip install 'fedmerge[tracking]')"
            ) from None
        self._mlflow: Any = mlflow
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(Path(directory).resolve().as_uri())
        if experiment:
            mlflow.set_experiment(experiment)
        self._run: Any = mlflow.start_run(run_name=run_name)

    def log_round(self, round_: int, values: Mapping[str, float]) -> None:
        clean = finite_values(values)
        if clean:
            self._mlflow.log_metrics(clean, step=int(round_))

    def close(self) -> None:
        self._mlflow.end_run()


def check_tracker(kind: str) -> None:
    """Refuse (ConfigError) a ``tracking`` value that is neither empty nor one of :data:`TRACKERS`."""
    if kind and kind not in TRACKERS:
        raise ConfigError(f"tracking={kind!r} must be one of {list(TRACKERS)} (or empty to turn it off)")


def open_sink(
    kind: str,
    directory: str | Path | None,
    *,
    run_name: str | None = None,
    experiment: str | None = None,
) -> MetricsSink | None:
    """The sink for ``tracking=kind`` (None when ``kind`` is empty). TensorBoard needs ``directory``."""
    check_tracker(kind)
    if not kind:
        return None
    if kind == "tensorboard":
        if not directory:
            raise ConfigError("tracking='tensorboard' needs tracking-dir: the directory of its event files")
        return TensorBoardSink(directory)
    return MLflowSink(directory, run_name=run_name, experiment=experiment)
