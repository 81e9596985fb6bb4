"""A plain Flower ClientApp, written the way Flower's quickstarts write one. It imports nothing from
fedmerge: it is the test that fedmerge's ServerApp speaks Flower's conventions.

Per ``train`` message it loads the model from ``msg.content["arrays"]``, reads ``lr`` and
``local-epochs`` from ``msg.content["config"]``, trains on its slice of scikit-learn's digits (the
slice ``partition-id`` of ``num-partitions``), and replies its full weights as ``"arrays"`` with a
``"metrics"`` MetricRecord holding ``num-examples`` and ``train_loss``. Per ``evaluate`` message it
replies ``eval_loss`` and ``eval_acc`` of the received weights on its slice's held-out fifth, with
``num-examples``, as Flower's quickstarts do. The model is the same
64→128→64→10 MLP as fedmerge's built-in ``digits`` task (same parameter names), so a store whose
base is that task's works with it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn


class Net(nn.Module):
    """64 → 128 → 64 → 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``num_partitions``-th sample of a fixed shuffle of the digits, starting at ``partition_id``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(1234).permutation(len(bunch.target))[partition_id::num_partitions]
    x = torch.tensor(bunch.data[perm], dtype=torch.float32) / 16.0
    return x, torch.tensor(bunch.target[perm], dtype=torch.long)


def split(
    x: torch.Tensor, y: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, held-out): the last fifth of the slice is held out for evaluation."""
    cut = len(y) - len(y) // 5
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train_model(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> float:
    """Plain SGD; returns the mean training loss of the last epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    loss_sum, batches = 0.0, 0
    for _ in range(epochs):
        loss_sum, batches = 0.0, 0
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum, batches = loss_sum + float(loss), batches + 1
    return loss_sum / max(batches, 1)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's quickstart shape: ``"arrays"`` + ``"config"`` in, ``"arrays"`` + ``"metrics"`` out."""
    arrays, config = msg.content["arrays"], msg.content["config"]
    assert isinstance(arrays, ArrayRecord) and isinstance(config, ConfigRecord)
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    pid = int(str(context.node_config["partition-id"]))
    (x, y), _ = split(*load_partition(pid, int(str(context.node_config["num-partitions"]))))
    epochs, lr = int(str(config.get("local-epochs", 1))), float(str(config.get("lr", 0.05)))
    loss = train_model(net, x, y, epochs, lr, seed=1000 * int(str(config.get("server-round", 0))) + pid)
    content = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Flower's quickstart shape: ``"arrays"`` in, ``"metrics"`` (``eval_loss``, ``eval_acc``,
    ``num-examples``) out."""
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    pid = int(str(context.node_config["partition-id"]))
    _, (x, y) = split(*load_partition(pid, int(str(context.node_config["num-partitions"]))))
    net.eval()
    with torch.no_grad():
        logits = net(x)
        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(dim=1) == y).float().mean())
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
