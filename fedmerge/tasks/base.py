"""The task protocol: what fedmerge needs from the model and data a federation trains.

A *task* builds a model, trains it locally on a client's data and scores it; :class:`Task` is the
protocol the round engine, the ClientApps and the simulations rely on (docs/flower.md, "Your own
task"). :class:`ClientData` and :class:`Split` carry one client's data; :func:`check_data_path` and
:func:`load_xy_file` read a node's private data from its ``data-path``. Built-in tasks implement it
(:mod:`fedmerge.tasks.hf_causal_lm` here; the toy tasks of the simulations through the
``fedmerge.tasks`` entry-point group), and a new task is one file implementing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError

if TYPE_CHECKING:  # peft is the [lora] extra: a server that runs rounds does not need it
    from peft import PeftModel


@dataclass(frozen=True)
class Split:
    """Aligned sample tensors: inputs ``x``, targets ``y`` and the ``groups`` a partitioner splits on
    (the class label for classification, the sub-task id for the language task)."""

    x: Tensor
    y: Tensor
    groups: Tensor

    def __post_init__(self) -> None:
        if not len(self.x) == len(self.y) == len(self.groups):
            raise ConfigError(
                f"Split tensors disagree in length: x={len(self.x)}, y={len(self.y)}, "
                f"groups={len(self.groups)}; build x, y and groups from the same samples"
            )

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, indices: np.ndarray | Tensor) -> Split:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Split(self.x[idx], self.y[idx], self.groups[idx])


@dataclass(frozen=True)
class ClientData:
    """One simulated client's local data: a training split and a test split from the same distribution."""

    client_id: int
    train: Split
    test: Split

    @property
    def num_examples(self) -> int:
        """Training examples: the weight FedAvg gives this client (Flower's ``"num-examples"``)."""
        return len(self.train)


class DataPathError(ConfigError):
    """A node's ``data-path`` does not exist, cannot be read or does not hold what the task reads."""


def check_data_path(path: str | Path) -> Path:
    """``path`` as a Path if it exists and is readable, else :class:`DataPathError` naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataPathError(
            f"data-path {str(path)!r} does not exist on this node; start the SuperNode with "
            '--node-config "data-path=/path/to/local/data"'
        )
    if not os.access(p, os.R_OK):
        raise DataPathError(f"data-path {str(path)!r} is not readable by this node's user")
    return p


def load_xy_file(path: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> ClientData:
    """ClientData from a ``.npz``/``.pt`` file holding ``x`` and ``y`` (and optionally ``groups``)."""
    p = check_data_path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                raw = {k: torch.as_tensor(z[k]) for k in z.files}
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reading failure is the node's data problem, reported as such
        why = f"{type(exc).__name__}: {exc}"
        raise DataPathError(f"data-path {str(path)!r} could not be read ({why})") from exc
    if not isinstance(raw, dict) or "x" not in raw or "y" not in raw:
        raise DataPathError(f"data-path {str(path)!r} must hold tensors 'x' and 'y' (.npz or .pt)")
    x, y = torch.as_tensor(raw["x"]), torch.as_tensor(raw["y"])
    groups = torch.as_tensor(raw["groups"]) if "groups" in raw else torch.zeros(len(y), dtype=torch.long)
    split = Split(x, y, groups)
    if len(split) < 2:
        raise DataPathError(f"data-path {str(path)!r} holds {len(split)} samples; at least 2 are needed")
    perm = np.random.default_rng([seed, 17]).permutation(len(split))
    n_test = min(max(round(test_fraction * len(split)), 0), len(split) - 1)
    return ClientData(0, train=split.subset(perm[n_test:]), test=split.subset(perm[:n_test]))


@runtime_checkable
class Task(Protocol):
    """What the simulation runner needs from a task. All randomness is explicit (seeds, generators)."""

    name: str
    num_classes: int | None
    lora_targets: list[str]

    def build_model(self, generator_seed: int) -> nn.Module:
        """A freshly initialised model; the same seed gives the same weights."""
        ...

    def pretrained_base(self, seed: int) -> dict[str, Tensor]:
        """Base weights pre-trained on the task's pretraining split (deterministic, cached in-process)."""
        ...

    def client_datasets(
        self,
        num_clients: int,
        partitioner: str,
        seed: int,
        *,
        test_fraction: float = 0.2,
        **partitioner_args: Any,
    ) -> list[ClientData]:
        """Partition the client pool among ``num_clients`` clients; each part split into train and test."""
        ...

    def global_test_set(self) -> Split:
        """Held-out data used by no client and not by pretraining."""
        ...

    def train(
        self,
        model: nn.Module,
        data: ClientData,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
    ) -> dict[str, float]:
        """Fine-tune ``model`` in place on ``data.train``; returns ``num-examples`` and ``train-loss``."""
        ...

    def evaluate(self, model: nn.Module, data: Split, device: str | torch.device = "cpu") -> dict[str, float]:
        """``loss``, ``accuracy`` and ``num-examples`` of ``model`` on ``data``."""
        ...

    def train_lora(
        self,
        base_model: nn.Module,
        data: ClientData,
        rank: int,
        alpha: float,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
    ) -> tuple[PeftModel, dict[str, float]]:
        """Wrap a copy of ``base_model`` with peft LoRA on :attr:`lora_targets`, train only the adapters."""
        ...
