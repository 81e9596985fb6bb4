"""A Flower ClientApp with the protocol of Flower's ``examples/quickstart-pytorch`` (flwr 1.42): the
same model (the 60-minute-blitz CNN on 3×32×32 images, 10 classes, parameter names ``conv1``…``fc3``),
the same message handling and the same run-config reads, written with Flower's API only (it imports
nothing from fedmerge). Only its data loading differs: instead of downloading CIFAR-10 with
``flwr-datasets``, :func:`load_data` builds a synthetic CIFAR-shaped partition on the node
(deterministic per partition; each class is a colour pattern plus noise, so the model can learn).

Per ``train`` message: load ``msg.content["arrays"]``, read ``batch-size`` and ``local-epochs`` from
the run config and ``lr`` from the message's ``"config"``, train with SGD (momentum 0.9) on the
partition ``partition-id`` of ``num-partitions`` (node config), reply ``"arrays"`` + ``"metrics"``
(``train_loss``, ``num-examples``). Per ``evaluate`` message: reply ``"metrics"`` with ``eval_loss``,
``eval_acc`` and ``num-examples`` on the partition's held-out fifth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """conv(3→6, 5) → pool → conv(6→16, 5) → pool → 400 → 120 → 84 → 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


SAMPLES_PER_PARTITION = 120


def load_data(partition_id: int, num_partitions: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """(train loader, test loader) of a synthetic CIFAR-shaped partition: 80 % train, 20 % test."""
    gen = torch.Generator().manual_seed(1000 * num_partitions + partition_id)
    patterns = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 10, (SAMPLES_PER_PARTITION,), generator=gen)
    images = patterns[labels] + 0.8 * torch.randn(SAMPLES_PER_PARTITION, 3, 32, 32, generator=gen)
    cut = SAMPLES_PER_PARTITION * 4 // 5
    train = TensorDataset(images[:cut], labels[:cut])
    test = TensorDataset(images[cut:], labels[cut:])
    shuffle = torch.Generator().manual_seed(partition_id)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle), DataLoader(
        test, batch_size=batch_size
    )


def train_fn(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """SGD with momentum; the mean training loss over all batches."""
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running, batches = running + loss.item(), batches + 1
    return running / max(batches, 1)


def test_fn(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean loss per batch, accuracy) on ``loader``."""
    net.to(device)
    net.eval()
    loss, correct, total, batches = 0.0, 0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            out = net(images.to(device))
            loss += F.cross_entropy(out, labels.to(device)).item()
            correct += int((out.argmax(1) == labels.to(device)).sum())
            total, batches = total + len(labels), batches + 1
    return loss / max(batches, 1), correct / max(total, 1)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    trainloader, _ = load_data(partition_id, num_partitions, int(context.run_config["batch-size"]))
    train_loss = train_fn(
        model, trainloader, int(context.run_config["local-epochs"]),
        float(msg.content["config"]["lr"]), device,  # type: ignore[arg-type]
    )  # fmt: skip
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})  # type: ignore[arg-type]
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    _, valloader = load_data(partition_id, num_partitions, int(context.run_config["batch-size"]))
    eval_loss, eval_acc = test_fn(model, valloader, device)
    n = len(valloader.dataset)  # type: ignore[arg-type]
    metrics = MetricRecord({"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": n})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
