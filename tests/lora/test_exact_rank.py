"""merge_lora(space="product") is exact by default; asked-for truncations report their error.

Adapters are real peft adapters (random A and B) on a model whose layers are larger than the summed
ranks, so the mean ΔW of three rank-4 adapters has rank 12 and truncating to 4 loses most of it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedmerge.delta.lora import (
    LoraAdapter,
    LoraTruncationWarning,
    load_peft_adapter,
    lora_to_delta,
    merge_lora,
    numerical_rank,
    save_peft_adapter,
)


class Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(32, 24)
        self.v_proj = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(torch.tanh(self.v_proj(x)))


def wide(seed: int = 0) -> Wide:
    torch.manual_seed(seed)  # nn.Linear initialises from the global generator
    return Wide()


def adapter(directory: Path, seed: int, rank: int) -> LoraAdapter:
    base = wide()
    torch.manual_seed(seed)  # peft initialises A and B from the global generator
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, cfg).save_pretrained(str(directory))
    return load_peft_adapter(directory)


def mean_delta(adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    deltas = [lora_to_delta(a) for a in adapters]
    return {k: torch.stack([d[k] for d in deltas]).mean(0) for k in deltas[0]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_three_rank_4_adapters_merge_exactly_at_rank_12_by_default(tmp_path: Path) -> None:
    adapters = [adapter(tmp_path / str(i), 10 + i, 4) for i in range(3)]
    truth = mean_delta(adapters)
    assert {numerical_rank(t) for t in truth.values()} == {12}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraTruncationWarning)  # nothing is truncated: no warning
        merged = merge_lora(adapters)
    assert merged.rank == 12 and merged.exact_rank == 12
    got = lora_to_delta(merged)
    assert all(rel(got[k], truth[k]) < 1e-5 for k in truth)
    assert merged.total_residual < 1e-6 and max(merged.residuals.values()) < 1e-6
    save_peft_adapter(merged, tmp_path / "merged")  # and peft applies it as the merged update
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    model = PeftModel.from_pretrained(wide(), str(tmp_path / "merged")).merge_and_unload()
    base = wide()
    for name in ("q_proj", "v_proj"):
        w = getattr(model, name).weight - getattr(base, name).weight
        assert rel(w.detach(), truth[f"{name}.weight"]) < 1e-5
    assert model(x).shape == (3, 24)


def test_mixed_input_ranks_merge_exactly(tmp_path: Path) -> None:
    adapters = [adapter(tmp_path / str(r), 20 + r, r) for r in (2, 4, 8)]
    truth = mean_delta(adapters)
    merged = merge_lora(adapters, space="product")
    assert merged.rank == 14  # Σ r_i, below min(m, n) = 24
    got = lora_to_delta(merged)
    assert all(rel(got[k], truth[k]) < 1e-5 for k in truth)
    stacked = lora_to_delta(merge_lora(adapters, space="stack"))
    assert all(rel(stacked[k], truth[k]) < 1e-5 for k in truth)


def test_exact_rank_is_capped_by_the_matrix_size(tmp_path: Path) -> None:
    adapters = [adapter(tmp_path / str(i), 30 + i, 8) for i in range(4)]  # Σ r = 32 > 24 rows of q_proj
    merged = merge_lora(adapters)
    truth = mean_delta(adapters)
    assert merged.rank == 32 and merged.modules["q_proj.weight"].rank == 32
    assert numerical_rank(truth["q_proj.weight"]) == 24
    got = lora_to_delta(merged)
    assert all(rel(got[k], truth[k]) < 1e-5 for k in truth)


def test_a_requested_truncation_reports_its_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapters = [adapter(tmp_path / str(i), 10 + i, 4) for i in range(3)]
    truth = mean_delta(adapters)
    with (
        caplog.at_level(logging.WARNING, logger="fedmerge.delta.lora"),
        pytest.warns(LoraTruncationWarning, match="rank 4 is below the exact rank 12"),
    ):
        merged = merge_lora(adapters, rank=4)
    assert "relative error" in caplog.text
    got = lora_to_delta(merged)
    for k in truth:  # reported per-module residuals are the measured errors
        assert merged.residuals[k] == pytest.approx(rel(got[k], truth[k]), rel=1e-3)
        assert 0.3 < merged.residuals[k] < 1
    total = float(sum((got[k] - truth[k]).norm() ** 2 for k in truth) ** 0.5)
    norm = float(sum(truth[k].norm() ** 2 for k in truth) ** 0.5)
    assert merged.total_residual == pytest.approx(total / norm, rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraTruncationWarning)
        assert merge_lora(adapters, rank=12).total_residual < 1e-6  # asking for enough is not a truncation
