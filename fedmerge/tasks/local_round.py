"""One client's local round: load the current base, fine-tune on local data, return what changed.

    full:  τ = θ_ft − θ_base                       (a task vector, every floating parameter)
    lora:  τ = merge(θ_base, (α/r)·B·A) − θ_base   (dense; non-zero only on the LoRA target weights),
           plus the adapter factors themselves (peft's ``get_peft_model_state_dict``)

All randomness comes from :func:`client_generator` (seed, round, client), so a round is reproducible.
This is the client half of a simulated federated round; the Flower ClientApp and the runner call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedmerge.delta.state_dict import StateDict, TaskVector, task_vector
from fedmerge.errors import ConfigError
from fedmerge.tasks.base import ClientData, Task
from fedmerge.tasks.model_pool import borrowed_model, reuses_models
from fedmerge.tasks.training import seed_from

Mode = Literal["full", "lora"]


def client_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, round, client) through ``numpy.random.SeedSequence``."""
    return torch.Generator().manual_seed(seed_from(seed, round_, client))


@dataclass(frozen=True)
class LocalUpdate:
    """A client's reply: the dense delta against the base it received, its metrics and, for LoRA, the
    adapter factors (names as peft saves them)."""

    delta: TaskVector
    metrics: dict[str, float]
    adapter: StateDict | None = None


def _cpu(state: dict[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def local_round(
    task: Task,
    base: StateDict,
    data: ClientData,
    *,
    seed: int,
    round_: int,
    mode: Mode = "full",
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 32,
    lora_rank: int = 4,
    lora_alpha: float = 8.0,
    device: str | torch.device = "cpu",
    test_metrics: bool = True,
) -> LocalUpdate:
    """Fine-tune ``task``'s model, initialised to ``base``, on ``data.train`` and return the update.

    ``metrics`` holds the task's training metrics (``num-examples``, ``train-loss`` …) and, with
    ``test_metrics``, the local test ``test-accuracy``/``test-loss`` before (``base-`` prefix) and after
    training (two evaluations of ``data.test``; without, the update costs only the training).
    """
    if mode not in ("full", "lora"):
        raise ConfigError(f"local round mode must be 'full' or 'lora', got {mode!r}")
    generator = client_generator(seed, round_, data.client_id)
    # full fine-tuning on the CPU, of a task that says its train() leaves nothing but the weights,
    # leaves the model reusable: the next round loads every weight again
    reusable = mode == "full" and torch.device(device).type == "cpu" and reuses_models(task)
    with borrowed_model(task, seed, reuse=reusable) as model:
        model.load_state_dict(base)
        before = task.evaluate(model, data.test, device) if test_metrics else None
        adapter: StateDict | None = None
        if mode == "full":
            metrics = task.train(
                model, data, epochs=epochs, lr=lr, batch_size=batch_size, generator=generator, device=device
            )
            trained = model
        else:
            peft_model, metrics = task.train_lora(
                model, data, lora_rank, lora_alpha, epochs=epochs, lr=lr, batch_size=batch_size,
                generator=generator, device=device,
            )  # fmt: skip
            from peft import get_peft_model_state_dict  # peft (and transformers) load only for LoRA rounds

            adapter = _cpu(get_peft_model_state_dict(peft_model))
            trained = peft_model.merge_and_unload()
        delta = task_vector(base, _cpu(trained.state_dict()))
        if before is not None:
            after = task.evaluate(trained, data.test, device)
            metrics = {
                **metrics,
                "base-test-accuracy": before["accuracy"],
                "base-test-loss": before["loss"],
                "test-accuracy": after["accuracy"],
                "test-loss": after["loss"],
            }
        return LocalUpdate(delta=delta, metrics=metrics, adapter=adapter)
