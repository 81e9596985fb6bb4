"""``fedmerge push DIR`` with a Hugging Face model directory (sharded): the store starts from the same
model with ``fedmerge init``, the fine-tuned directory is submitted to a real intake server and merged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from service_helpers import TOKEN, server_config, target

from fedmerge.service.client import (
    ClientOptions,
    ServiceCallError,
    detect_format,
    submit_expert,
    wait_merged,
)
from fedmerge.service.server import IntakeServer
from fedmerge.store import ModelStore
from fedmerge.store.init import init_store


def tiny_gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=24, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture
def base_and_expert(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_gpt2(0)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "expert", max_shard_size="4KB")  # sharded, with an index
    return tmp_path / "base", tmp_path / "expert"


@pytest.fixture
def intake(tmp_path: Path, base_and_expert: tuple[Path, Path]) -> Iterator[IntakeServer]:
    init_store(tmp_path / "store", base_and_expert[0])
    srv = IntakeServer(server_config(tmp_path / "store", method="continual_task_arithmetic"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=0.5)


def test_a_sharded_hugging_face_directory_is_pushed_and_merged(
    intake: IntakeServer, base_and_expert: tuple[Path, Path], tmp_path: Path
) -> None:
    base, expert = base_and_expert
    assert len(list(expert.glob("*.safetensors"))) > 1
    assert detect_format(expert) == "checkpoint"
    opts = ClientOptions(target(intake), token=TOKEN)
    reply = submit_expert(opts, expert)
    sub = wait_merged(opts, reply.submission_id, timeout=60)
    assert sub.version, sub.reason
    with ModelStore.open(tmp_path / "store") as store:
        merged = dict(store.iter_materialized(sub.version))
    finetuned = transformers.GPT2LMHeadModel.from_pretrained(expert).state_dict()
    original = transformers.GPT2LMHeadModel.from_pretrained(base).state_dict()
    name = "transformer.h.0.attn.c_attn.weight"
    # continual task arithmetic after one expert: θ = θ_base + 0.3 · (θ_expert − θ_base)
    expected = original[name] + 0.3 * (finetuned[name] - original[name])
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_a_directory_that_is_neither_adapter_nor_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ServiceCallError, match="neither a peft adapter directory"):
        detect_format(tmp_path / "notes")
