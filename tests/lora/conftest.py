"""A tiny model adapted with real peft LoRA adapters (random B so ΔW ≠ 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"q_proj": torch.nn.Linear(12, 10), "v_proj": torch.nn.Linear(12, 12)})
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["v_proj"](x))
        return self.layers[-1]["q_proj"](x)


def build_base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)  # test-only: nn.Linear init uses the global generator
    return Tiny()


def save_adapter(directory: Path, seed: int, rank: int = 4, alpha: float = 8.0, rslora: bool = False) -> Tiny:
    base = build_base()
    torch.manual_seed(seed)  # peft initialises A and B from the global generator
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        use_rslora=rslora,
    )
    model = get_peft_model(base, config)
    model.save_pretrained(str(directory))
    return model  # type: ignore[return-value]


@pytest.fixture
def make_adapter():  # type: ignore[no-untyped-def]
    """save_adapter(directory, seed, rank=4, alpha=8.0, rslora=False) -> the peft model."""
    return save_adapter


@pytest.fixture
def make_base():  # type: ignore[no-untyped-def]
    """build_base(seed=0) -> the tiny base model."""
    return build_base


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    save_adapter(tmp_path / "a", seed=1)
    return tmp_path / "a"
