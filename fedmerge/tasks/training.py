"""Task-agnostic local training and evaluation loops, seeded by an explicit ``torch.Generator``.

A task supplies a :data:`BatchLoss` ``(model, x, y) -> (mean loss, correct, scored)``; :func:`fit` runs
Adam over seeded mini-batch permutations and :func:`measure` averages loss and accuracy per scored
target (a class label, or an answer token for the language task).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.seeds import seed_from_ints

BatchLoss = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, int, int]]
OptimizerName = Literal["adam", "sgd"]


def make_optimizer(
    name: OptimizerName, params: list[nn.Parameter], *, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam`` (Kingma & Ba 2015) or plain ``sgd`` (no momentum: FedAvg's local solver, McMahan et al. 2017).

    Both start from fresh state: a local round keeps no optimizer state between rounds.
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown local optimizer {name!r}; choose 'adam' or 'sgd'")


seed_from = seed_from_ints  # fedmerge.seeds is the one home of seed derivations


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op CPU threads, then restore the previous setting.

    The built-in models are tiny: one thread is fastest, and on a busy 2-core machine two threads
    contending with other processes made pretraining ten times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    weight_decay: float = 0.0,
    optimizer_name: OptimizerName = "adam",
) -> dict[str, float]:
    """Adam or SGD on the trainable parameters for ``epochs`` passes over (x, y) in seeded random order.

    Returns ``num-examples`` (len(x)), ``train-loss`` (mean loss of the last epoch, weighted per scored
    target), ``train-accuracy`` (last epoch) and ``steps``. The model is left on ``device``.
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"need epochs ≥ 0, batch_size ≥ 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    if len(x) == 0:
        raise ConfigError("cannot train on an empty split; give every client at least one training example")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    model.to(device)
    model.train()
    optimizer = make_optimizer(optimizer_name, params, lr=lr, weight_decay=weight_decay)
    loss_sum, correct_sum, scored_sum, steps = 0.0, 0, 0, 0
    for _ in range(epochs):
        loss_sum, correct_sum, scored_sum = 0.0, 0, 0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss, correct, scored = batch_loss(model, x[idx].to(device), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * scored
            correct_sum += correct
            scored_sum += scored
            steps += 1
    model.eval()
    return {
        "num-examples": float(len(x)),
        "train-loss": loss_sum / scored_sum if scored_sum else math.nan,
        "train-accuracy": correct_sum / scored_sum if scored_sum else math.nan,
        "steps": float(steps),
    }


@torch.no_grad()
def measure(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_loss: BatchLoss,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
) -> dict[str, float]:
    """``loss`` and ``accuracy`` per scored target and ``num-examples``; NaN metrics on an empty split."""
    model.to(device)
    was_training = model.training
    model.eval()
    loss_sum, correct_sum, scored_sum = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        loss, correct, scored = batch_loss(
            model, x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        )
        loss_sum += float(loss) * scored
        correct_sum += correct
        scored_sum += scored
    model.train(was_training)
    return {
        "loss": loss_sum / scored_sum if scored_sum else math.nan,
        "accuracy": correct_sum / scored_sum if scored_sum else math.nan,
        "num-examples": float(len(x)),
    }
