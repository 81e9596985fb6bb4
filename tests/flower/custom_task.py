"""A user's own task, named by import path in the run config (``task = "custom_task:make_task"``).

It implements only the required part of the task protocol (docs/flower.md, "Your own task"):
``build_model``, ``train``, ``evaluate`` and ``load_data`` (the node's ``data-path``), plus
``server_evaluate`` for pluggable server-side evaluation. No ``pretrained_base``: the store is
initialised from the model beforehand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge_simulations.tasks import ClientData, Split


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in R⁴ labelled by the sign of their first coordinate."""
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


class MyTask:
    def __init__(self) -> None:
        self.name = "custom"
        self.lora_targets = ["hidden", "out"]

    def build_model(self, generator_seed: int) -> nn.Module:
        torch.manual_seed(generator_seed)
        return TwoLayer()

    def load_data(self, path: str, *, seed: int = 0) -> ClientData:
        with np.load(Path(path)) as z:
            x, y = torch.as_tensor(z["x"]), torch.as_tensor(z["y"])
        split = Split(x, y, y)
        return ClientData(0, train=split.subset(np.arange(4, len(y))), test=split.subset(np.arange(4)))

    def train(
        self, model: nn.Module, data: ClientData, *, epochs: int, lr: float, batch_size: int,
        generator: torch.Generator, device: str | torch.device = "cpu",
    ) -> dict[str, float]:  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        loss = torch.zeros(())
        for _ in range(epochs):
            opt.zero_grad()
            loss = F.cross_entropy(model(data.train.x), data.train.y)
            loss.backward()
            opt.step()
        return {"num-examples": float(len(data.train)), "train-loss": float(loss)}

    def evaluate(self, model: nn.Module, data: Split, device: str | torch.device = "cpu") -> dict[str, float]:
        with torch.no_grad():
            logits = model(data.x)
            loss = float(F.cross_entropy(logits, data.y))
            acc = float((logits.argmax(-1) == data.y).float().mean())
        return {"loss": loss, "accuracy": acc, "num-examples": float(len(data))}

    def server_evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = synthetic(200, 99)
        return self.evaluate(model, Split(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(y)))


def make_task() -> MyTask:
    return MyTask()
