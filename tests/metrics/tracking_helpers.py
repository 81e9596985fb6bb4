"""Reading TensorBoard event files back (tensorboard's own reader)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag → {step: value} of every scalar in the event files under ``directory``."""
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
