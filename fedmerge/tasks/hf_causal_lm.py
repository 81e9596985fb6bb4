"""``hf_causal_lm``: any Hugging Face causal LM, described by its model directory (``config.json`` and
tokenizer files), trained on a node's private text file (one example per line).

The model directory is found, in order: the ``model_dir`` option; on the server, the files the store
keeps with its root version (``fedmerge init --base HF_DIR`` keeps ``config.json`` and the tokenizer;
:meth:`HFCausalLMTask.use_store_files`). So the ServerApp can check the store's base against the
architecture before the first round without any other setting. Nothing is downloaded: the model is
built with ``AutoModelForCausalLM.from_config``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.tasks.base import ClientData, Split, check_data_path
from fedmerge.tasks.training import fit, measure

IGNORE = -100


@dataclass
class HFCausalLMTask:
    """A causal LM from a Hugging Face model directory; see the module docstring."""

    model_dir: str | None = None
    max_length: int = 64
    name: str = field(init=False, default="hf_causal_lm")
    num_classes: int | None = field(init=False, default=None)
    lora_targets: list[str] = field(init=False, default_factory=lambda: ["q_proj", "v_proj"])
    _tmp: Any = field(init=False, default=None, repr=False)

    def use_store_files(self, files: dict[str, bytes]) -> None:
        """Use the model files a store keeps with its root (written to a private temporary folder)."""
        if self.model_dir is not None or "config.json" not in files:
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="fedmerge-hf-")
        for name, data in files.items():
            path = Path(self._tmp.name) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.model_dir = self._tmp.name

    def _dir(self) -> str:
        if self.model_dir is None:
            raise ConfigError(
                "task 'hf_causal_lm' needs the model's config.json: initialise the store with "
                "`fedmerge init --base HF_DIR` (the ServerApp reads it from the store)"
            )
        return self.model_dir

    def build_model(self, generator_seed: int) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self._dir())
        dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)

    def load_data(self, path: str | Path, *, seed: int = 0, test_fraction: float = 0.2) -> ClientData:
        """Lines of the text file at ``path`` tokenized with the model directory's tokenizer."""
        from transformers import AutoTokenizer

        lines = [ln for ln in check_data_path(path).read_text().splitlines() if ln.strip()]
        if len(lines) < 2:
            raise ConfigError(f"data-path {str(path)!r} holds {len(lines)} non-empty lines; need 2 or more")
        tok = AutoTokenizer.from_pretrained(self._dir())
        enc = tok(
            lines, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
        y[mask[:, 1:] == 0] = IGNORE
        split = Split(x, y, torch.zeros(len(x), dtype=torch.long))
        perm = np.random.default_rng([seed, 23]).permutation(len(split))
        n_test = min(max(round(test_fraction * len(split)), 1), len(split) - 1)
        return ClientData(0, train=split.subset(perm[n_test:]), test=split.subset(perm[:n_test]))

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
        logits = model(input_ids=x).logits
        scored = y != IGNORE
        loss = F.cross_entropy(logits[scored], y[scored])
        return loss, int((logits[scored].argmax(dim=-1) == y[scored]).sum()), int(scored.sum())

    def train(
        self, model: nn.Module, data: ClientData, *, epochs: int, lr: float, batch_size: int,
        generator: torch.Generator, device: str | torch.device = "cpu",
    ) -> dict[str, float]:  # fmt: skip
        return fit(
            model, data.train.x, data.train.y, self.batch_loss, epochs=epochs, lr=lr, batch_size=batch_size,
            generator=generator, device=device, optimizer_name="adam",
        )  # fmt: skip

    def evaluate(self, model: nn.Module, data: Split, device: str | torch.device = "cpu") -> dict[str, float]:
        return measure(model, data.x, data.y, self.batch_loss, device=device)
