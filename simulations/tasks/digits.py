"""``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, ships with scikit-learn, no download).

Model: an MLP 64→128→64→10 (ReLU), layers ``fc1``, ``fc2``, ``fc3`` (the LoRA targets).
Data, split once with a fixed data seed (independent of the experiment seed):
``global_fraction`` (20 %) is the global test set, ``pretrain_fraction`` (20 %) pre-trains the base,
the rest (≈ 1,078 images) is the client pool that partitioners divide. The base is deliberately
under-trained (``pretrain_epochs`` passes at a small learning rate) so local fine-tuning still helps.
Pixels are scaled to [0, 1]. Local training uses plain SGD (lr ≈ 0.05–0.2): under Dirichlet α=0.1 with 20
clients, 8 FedAvg rounds of 2 local epochs took global accuracy from 0.67 to 0.73 with SGD (lr 0.2) but
down to 0.52 with Adam (lr 1e-3), whose per-round fresh, normalised steps amplify client drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmerge.tasks.training import OptimizerName, fit
from fedmerge_simulations.tasks.base import Split, SupervisedTask


class DigitsMLP(nn.Module):
    """64 → 128 → 64 → 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass
class DigitsTask(SupervisedTask):
    """The digits classification task (10 classes); see the module docstring for the data layout."""

    data_seed: int = 0
    global_fraction: float = 0.2
    pretrain_fraction: float = 0.2
    pretrain_epochs: int = 5
    pretrain_lr: float = 1e-3
    local_optimizer: OptimizerName = "sgd"
    name: str = field(init=False, default="digits")
    num_classes: int | None = field(init=False, default=10)
    lora_targets: list[str] = field(init=False, default_factory=lambda: ["fc1", "fc2", "fc3"])

    @cached_property
    def _splits(self) -> tuple[Split, Split, Split]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.long)
        perm = np.random.default_rng(self.data_seed).permutation(len(y))
        n_global = int(self.global_fraction * len(y))
        n_pre = int(self.pretrain_fraction * len(y))
        full = Split(x, y, y)
        return (
            full.subset(perm[:n_global]),
            full.subset(perm[n_global : n_global + n_pre]),
            full.subset(perm[n_global + n_pre :]),
        )

    def global_test_set(self) -> Split:
        return self._splits[0]

    def pretraining_set(self) -> Split:
        return self._splits[1]

    def _client_pool(self) -> Split:
        return self._splits[2]

    def _init_model(self) -> nn.Module:
        return DigitsMLP()

    def _reinit(self, model: nn.Module, generator: torch.Generator) -> None:
        """PyTorch's default Linear init, drawn from ``generator``: U(−1/√fan_in, 1/√fan_in)."""
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                with torch.no_grad():
                    module.weight.uniform_(-bound, bound, generator=generator)
                    if module.bias is not None:
                        module.bias.uniform_(-bound, bound, generator=generator)

    def _pretrain(self, model: nn.Module, generator: torch.Generator) -> None:
        data = self.pretraining_set()
        fit(
            model, data.x, data.y, self.batch_loss, epochs=self.pretrain_epochs, lr=self.pretrain_lr,
            batch_size=32, generator=generator,
        )  # fmt: skip

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, int((logits.argmax(dim=-1) == y).sum()), len(y)
