"""``tiny_lm``: a tiny causal Llama pre-trained on synthetic sequence tasks, fine-tuned on unseen ones.

A miniature of federated instruction tuning, with nothing downloaded. Every sample is

    [BOS, TASK_t, a_1 … a_n, SEP, b_1 … b_n, EOS]        a_i ∈ {0 … 15},  b = f_t(a)

where ``f_t`` is one of the rule-based sub-tasks below and ``TASK_t`` is its instruction token. The
model reads the sequence shifted by one; loss and accuracy count only the answer tokens b_1 … b_n
(next-token accuracy on the answer). The base is pre-trained on :data:`PRETRAIN_TASKS`; the client
pool holds only :data:`CLIENT_TASKS` (its ``groups`` are their sub-task ids), so partitioning with
``"task"`` gives each client a different sub-task that the base has never seen.

Model: ``transformers.LlamaConfig`` (2 layers, hidden 64, 4 heads, vocab 64) built with
``AutoModelForCausalLM.from_config`` — no download. Pre-training takes a few seconds on 2 CPU cores;
the result is cached in-process per seed and, when ``cache_dir`` is set, on disk as safetensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedmerge.tasks.training import fit, seed_from
from fedmerge_simulations.tasks.base import Split, SupervisedTask

if TYPE_CHECKING:
    from transformers import LlamaConfig

PAD, BOS, SEP, EOS = 0, 1, 2, 3
TASK_TOKEN0 = 4  # instruction tokens 4 … 15
VALUE_TOKEN0 = 16  # values 0 … 15 are tokens 16 … 31
NUM_VALUES = 16
VOCAB_SIZE = 64
IGNORE = -100

SubTask = Callable[[np.ndarray], np.ndarray]

SUB_TASKS: dict[str, SubTask] = {
    "copy": lambda a: a,
    "reverse": lambda a: a[::-1],
    "add_one": lambda a: (a + 1) % NUM_VALUES,
    "sort": lambda a: np.sort(a),
    "rotate": lambda a: np.roll(a, -1),
    "add_two": lambda a: (a + 2) % NUM_VALUES,
    "swap_pairs": lambda a: a.reshape(-1, 2)[:, ::-1].reshape(-1),
    "sub_one": lambda a: (a - 1) % NUM_VALUES,
    "reverse_add_one": lambda a: (a[::-1] + 1) % NUM_VALUES,
}
"""Sub-task name → f(a) on an int array of length n (n even); its instruction token is fixed by order."""

PRETRAIN_TASKS = ("copy", "reverse", "add_one")
CLIENT_TASKS = ("sort", "rotate", "add_two", "swap_pairs", "sub_one", "reverse_add_one")


def task_token(name: str) -> int:
    return TASK_TOKEN0 + list(SUB_TASKS).index(name)


def make_sequences(task: str, count: int, length: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``count`` samples of ``task``: model inputs x (seq[:-1]) and targets y (seq[1:], IGNORE off-answer)."""
    a = rng.integers(0, NUM_VALUES, size=(count, length))
    b = np.stack([SUB_TASKS[task](row) for row in a])
    seq = np.concatenate(
        [
            np.full((count, 1), BOS),
            np.full((count, 1), task_token(task)),
            a + VALUE_TOKEN0,
            np.full((count, 1), SEP),
            b + VALUE_TOKEN0,
            np.full((count, 1), EOS),
        ],
        axis=1,
    )
    x, y = seq[:, :-1].copy(), seq[:, 1:].copy()
    answer_start = length + 2  # y[j] = seq[j+1]; b_1 is seq[length + 3]
    y[:, :answer_start] = IGNORE
    y[:, answer_start + length :] = IGNORE
    return torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)


def _build(tasks: tuple[str, ...], per_task: int, length: int, rng: np.random.Generator) -> Split:
    xs, ys, gs = [], [], []
    for gid, task in enumerate(tasks):
        x, y = make_sequences(task, per_task, length, rng)
        xs.append(x)
        ys.append(y)
        gs.append(torch.full((per_task,), gid, dtype=torch.long))
    return Split(torch.cat(xs), torch.cat(ys), torch.cat(gs))


@dataclass
class TinyLMTask(SupervisedTask):
    """The synthetic sequence-task language model; see the module docstring."""

    data_seed: int = 0
    length: int = 6
    pool_per_task: int = 240
    test_per_task: int = 60
    pretrain_samples: int = 6000
    pretrain_epochs: int = 2
    pretrain_lr: float = 3e-3
    cache_dir: Path | None = None
    name: str = field(init=False, default="tiny_lm")
    num_classes: int | None = field(init=False, default=None)
    lora_targets: list[str] = field(
        init=False, default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )

    @property
    def client_task_names(self) -> tuple[str, ...]:
        """Sub-task of each group id in the client pool and the global test set."""
        return CLIENT_TASKS

    def config(self) -> LlamaConfig:
        from transformers import LlamaConfig  # transformers loads only when this task builds a model

        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2 * self.length + 8,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            tie_word_embeddings=False,
            use_cache=False,
        )

    @cached_property
    def _splits(self) -> tuple[Split, Split, Split]:
        rng = np.random.default_rng(seed_from(self.data_seed, 7))
        pool = _build(CLIENT_TASKS, self.pool_per_task, self.length, rng)
        test = _build(CLIENT_TASKS, self.test_per_task, self.length, rng)
        per = -(-self.pretrain_samples // len(PRETRAIN_TASKS))
        pre = _build(PRETRAIN_TASKS, per, self.length, rng)
        return test, pre, pool

    def global_test_set(self) -> Split:
        return self._splits[0]

    def pretraining_set(self) -> Split:
        return self._splits[1]

    def _client_pool(self) -> Split:
        return self._splits[2]

    def _init_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(self.config())

    def _reinit(self, model: nn.Module, generator: torch.Generator) -> None:
        """Llama's init from ``generator``: N(0, 0.02) for matrices and embeddings, ones for RMSNorm."""
        std = self.config().initializer_range
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                elif param.ndim >= 2:
                    param.normal_(0.0, std, generator=generator)
                else:
                    param.zero_()

    def _cache_path(self, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = f"{self.name}-d{self.data_seed}-n{self.length}-p{self.pretrain_samples}x{self.pretrain_epochs}"
        return Path(self.cache_dir) / f"{key}-lr{self.pretrain_lr:g}-s{seed}.safetensors"

    def pretrained_base(self, seed: int) -> dict[str, Tensor]:
        path = self._cache_path(seed)
        if seed not in self._base_cache and path is not None and path.exists():
            self._base_cache[seed] = load_file(path)
        state = super().pretrained_base(seed)
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
            tmp.replace(path)
        return state

    def _pretrain(self, model: nn.Module, generator: torch.Generator) -> None:
        data = self.pretraining_set()
        fit(
            model, data.x, data.y, self.batch_loss, epochs=self.pretrain_epochs, lr=self.pretrain_lr,
            batch_size=64, generator=generator,
        )  # fmt: skip

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
        logits = model(input_ids=x).logits
        mask = y != IGNORE
        loss = F.cross_entropy(logits[mask], y[mask])
        return loss, int((logits[mask].argmax(dim=-1) == y[mask]).sum()), int(mask.sum())
