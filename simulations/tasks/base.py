"""The simulations' supervised tasks: a locally pre-trained base model, a pool of client data
(partitioned with :mod:`simulations.partition`), a held-out global test set, a local training step and
an evaluation. The protocol they implement, :class:`fedmerge.tasks.Task`, lives in the library;
:class:`SupervisedTask` implements everything but the data, the model and the per-batch loss, so a
new toy task is one file that subclasses it (see :mod:`simulations.tasks.digits` and
:mod:`simulations.tasks.tiny_lm`).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fedmerge.delta.fisher import diagonal_fisher
from fedmerge.errors import ConfigError
from fedmerge.tasks.base import ClientData, Split, load_xy_file
from fedmerge.tasks.training import (
    BatchLoss,
    OptimizerName,
    fit,
    measure,
    seed_from,
    torch_threads,
)
from fedmerge_simulations.partition import partition

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class SupervisedTask(ABC):
    """Shared implementation of :class:`Task`: subclasses provide the data, the model and the batch loss.

    Subclasses implement :meth:`_pretraining_split`, :meth:`_client_pool`, :meth:`global_test_set`,
    :meth:`_init_model` and :meth:`batch_loss`, and may override :meth:`_pretrain`.
    """

    name: str = field(init=False, default="")
    num_classes: int | None = field(init=False, default=None)
    lora_targets: list[str] = field(init=False, default_factory=list)
    local_optimizer: OptimizerName = "adam"
    """Optimizer of :meth:`train` and :meth:`train_lora` (pretraining always uses Adam)."""
    _base_cache: dict[int, dict[str, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # train() leaves nothing in the model but its weights: a process may reuse one model between
    # full-fine-tuning rounds (fedmerge.tasks.model_pool)
    reuse_model: ClassVar[bool] = True

    # ----- what a subclass provides ---------------------------------------------------------------
    @abstractmethod
    def _init_model(self) -> nn.Module:
        """Construct the model (its initial values are overwritten by :meth:`_reinit`)."""

    @abstractmethod
    def _reinit(self, model: nn.Module, generator: torch.Generator) -> None:
        """Initialise every parameter of ``model`` from ``generator`` (no global RNG)."""

    @abstractmethod
    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
        """Mean loss over the scored targets of the batch, number correct, number scored."""

    @abstractmethod
    def _client_pool(self) -> Split:
        """The data partitioned among clients."""

    @abstractmethod
    def global_test_set(self) -> Split:
        """Held-out data used by no client and not by pretraining."""

    @abstractmethod
    def _pretrain(self, model: nn.Module, generator: torch.Generator) -> None:
        """Pre-train ``model`` in place on the pretraining split."""

    # ----- the Task protocol ------------------------------------------------------------------------
    def build_model(self, generator_seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; keep it untouched
            model = self._init_model()
        self._reinit(model, torch.Generator().manual_seed(generator_seed))
        return model

    def pretrained_base(self, seed: int) -> dict[str, Tensor]:
        if seed not in self._base_cache:
            model = self.build_model(seed)
            with torch_threads(1):
                self._pretrain(model, torch.Generator().manual_seed(seed_from(seed, 1)))
            self._base_cache[seed] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return {k: v.clone() for k, v in self._base_cache[seed].items()}

    def client_datasets(
        self,
        num_clients: int,
        partitioner: str,
        seed: int,
        *,
        test_fraction: float = 0.2,
        **partitioner_args: Any,
    ) -> list[ClientData]:
        if not 0.0 <= test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
        pool = self._client_pool()
        parts = partition(partitioner, pool.groups.numpy(), num_clients, seed, **partitioner_args)
        clients = []
        for cid, idx in enumerate(parts):
            if idx.size == 0:
                raise ConfigError(
                    f"partitioner {partitioner!r} gave client {cid} no samples; "
                    "use min_partition_size ≥ 1 or fewer clients"
                )
            perm = np.random.default_rng([seed, cid]).permutation(idx)
            n_test = min(round(test_fraction * perm.size), perm.size - 1)
            clients.append(ClientData(cid, train=pool.subset(perm[n_test:]), test=pool.subset(perm[:n_test])))
        return clients

    def client_groups(self) -> np.ndarray:
        """The ``groups`` of the client pool (what partitioners split on), e.g. for a partition summary."""
        return self._client_pool().groups.numpy()

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
        return fit(
            model, data.train.x, data.train.y, self._loss_fn, epochs=epochs, lr=lr,
            batch_size=batch_size, generator=generator, device=device, optimizer_name=self.local_optimizer,
        )  # fmt: skip

    def evaluate(self, model: nn.Module, data: Split, device: str | torch.device = "cpu") -> dict[str, float]:
        return measure(model, data.x, data.y, self._loss_fn, device=device)

    def diagonal_fisher(
        self, weights: dict[str, Tensor], data: Split, max_examples: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The empirical diagonal Fisher (:func:`fedmerge.delta.fisher.diagonal_fisher`) of the model at
        ``weights`` over the floating tensors of ``weights``, on at most ``max_examples`` examples of
        ``data`` drawn without replacement from ``generator``."""
        model = self.build_model(0)
        model.load_state_dict(weights)
        n = min(int(max_examples), len(data))
        chosen = torch.randperm(len(data), generator=generator)[:n].tolist()

        def example_loss(m: nn.Module, i: int) -> Tensor:
            return self.batch_loss(m, data.x[i : i + 1], data.y[i : i + 1])[0]

        names = [k for k, v in weights.items() if v.is_floating_point()]
        return diagonal_fisher(model, example_loss, chosen, names)

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
        """LoRA fine-tuning (Hu et al. 2022): W' = W + (alpha/rank)·B·A with A, B the only trained weights.

        A copy of ``base_model`` is wrapped (the caller's model is left untouched); A is initialised
        Kaiming-uniform from ``generator`` and B at zero, so training starts from the base model.
        """
        if rank < 1 or alpha <= 0:
            raise ConfigError(f"LoRA rank must be ≥ 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        from peft import LoraConfig, get_peft_model  # peft (and transformers) load only for LoRA rounds

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; peft computes alpha / r in float
            target_modules=list(self.lora_targets),
            lora_dropout=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            peft_model = get_peft_model(copy.deepcopy(base_model), config)
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
        metrics = self.train(
            peft_model, data, epochs=epochs, lr=lr, batch_size=batch_size, generator=generator, device=device
        )
        return peft_model, metrics

    def load_data(self, path: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> ClientData:
        """A node's private data from ``path`` (``--node-config "data-path=..."``): a ``.npz`` or
        ``.pt`` file with tensors ``x`` and ``y`` (and optionally ``groups``), split seeded into train
        and test. :class:`DataPathError` when the file is missing, unreadable or malformed."""
        return load_xy_file(path, test_fraction=test_fraction, seed=seed)

    # ----- helpers ----------------------------------------------------------------------------------
    @property
    def _loss_fn(self) -> BatchLoss:
        return self.batch_loss
