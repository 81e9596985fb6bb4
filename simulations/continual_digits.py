"""A stream of image tasks for continual merging, built from scikit-learn's digits (no download).

Design (why interference is real): every task is the 10-way digit classification of the 8×8 images
seen through its own fixed pixel permutation (permuted digits, a classic continual-learning stream).
One MLP with a *shared* 10-way head serves all tasks, so every expert rewrites the same weights:
the first layer must learn a different input wiring per task, and the hidden layers and head are
pulled in different directions. The base model is pre-trained on the un-permuted images (it knows
digits, not the permutations: near chance on a permuted task), and each expert is the base fully
fine-tuned on one task for a few epochs. A merged model is evaluated on each seen task's own test
images, with the task's permutation applied — there is no task-specific parameter at test time.

Everything is seeded: data split, permutations, initialisation and mini-batch order come from
``torch.Generator`` objects derived from the seed; nothing touches the global RNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

from fedmerge.delta.state_dict import StateDict, TaskVector, task_vector


@dataclass(frozen=True)
class StreamConfig:
    """Sizes and training settings of the stream (defaults: a few seconds on 2 CPU cores)."""

    num_tasks: int = 8
    hidden: int = 128
    depth: int = 2  # hidden layers
    pretrain_epochs: int = 30
    finetune_epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    test_fraction: float = 0.3
    permuted_fraction: float = 1.0  # share of the 64 pixels each task permutes
    seed: int = 0


@dataclass
class DigitsStream:
    """The base model, one expert task vector per task, and each task's permuted test set."""

    config: StreamConfig
    base: StateDict
    experts: list[TaskVector]
    permutations: list[torch.Tensor]
    x_test: torch.Tensor
    y_test: torch.Tensor
    model: nn.Module = field(repr=False)

    def accuracy(self, params: Mapping[str, torch.Tensor], task: int) -> float:
        """Accuracy of the model with ``params`` on ``task``'s test images."""
        return evaluate(self.model, params, self.x_test[:, self.permutations[task]], self.y_test)

    def accuracy_with(self, delta: Mapping[str, torch.Tensor], task: int) -> float:
        """Accuracy of base + delta on ``task``."""
        return self.accuracy({k: self.base[k] + delta[k] for k in self.base}, task)


def generator(seed: int, *salt: int) -> torch.Generator:
    """A generator seeded from (seed, salt...) without touching global state."""
    value = seed
    for s in salt:
        value = (value * 1_000_003 + s + 1) % (1 << 62)
    return torch.Generator().manual_seed(value)


def digits_split(test_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): digits scaled to [0, 1], split by a seeded shuffle."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=g)
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def pixel_permutation(fraction: float, g: torch.Generator, pixels: int = 64) -> torch.Tensor:
    """A permutation of ``pixels`` indices that shuffles a random ``fraction`` of them among themselves."""
    perm = torch.arange(pixels)
    chosen = torch.randperm(pixels, generator=g)[: round(fraction * pixels)]
    perm[chosen] = chosen[torch.randperm(len(chosen), generator=g)]
    return perm


def build_mlp(hidden: int, depth: int, g: torch.Generator) -> nn.Sequential:
    """64 → hidden (×depth, ReLU) → 10, initialised from ``g`` (PyTorch's default init scheme)."""
    dims = [64] + [hidden] * depth + [10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        lin = nn.Linear(a, b)
        bound = 1.0 / a**0.5
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
        layers.append(lin)
        if i < depth:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int, g: torch.Generator
) -> None:
    """Adam on cross-entropy, mini-batches in a seeded order (in place)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` run with ``params``."""
    logits = functional_call(model, dict(params), (x,))
    return float((logits.argmax(dim=1) == y).float().mean())


def build_stream(config: StreamConfig | None = None) -> DigitsStream:
    """Pre-train the base on plain digits, then fine-tune one expert per permuted task."""
    cfg = config or StreamConfig()
    x_tr, y_tr, x_te, y_te = digits_split(cfg.test_fraction, generator(cfg.seed, 0))
    model = build_mlp(cfg.hidden, cfg.depth, generator(cfg.seed, 1))
    train(model, x_tr, y_tr, cfg.pretrain_epochs, cfg.lr, cfg.batch_size, generator(cfg.seed, 2))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = [
        pixel_permutation(cfg.permuted_fraction, generator(cfg.seed, 3, t)) for t in range(cfg.num_tasks)
    ]
    experts: list[TaskVector] = []
    for t, perm in enumerate(perms):
        model.load_state_dict(base)
        train(
            model, x_tr[:, perm], y_tr, cfg.finetune_epochs, cfg.lr, cfg.batch_size, generator(cfg.seed, 4, t)
        )
        experts.append(task_vector(base, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    model.load_state_dict(base)
    return DigitsStream(cfg, base, experts, perms, x_te, y_te, model)
