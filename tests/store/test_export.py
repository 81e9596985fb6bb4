"""Export writes the Hugging Face sharded-safetensors layout, streaming, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from store_test_helpers import commit_delta, tiny_delta, tiny_model

from fedmerge.errors import ConfigError
from fedmerge.store import ModelStore
from fedmerge.store.export import INDEX_FILE, PROVENANCE_FILE, SINGLE_FILE, plan_shards
from fedmerge.store.safetensors_format import TensorSpec


def _committed(store: ModelStore) -> str:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    return commit_delta(store, tiny_delta(base, 1), root.id, 1).id


def test_single_file_export_loads_with_safetensors(store: ModelStore, tmp_path: Path) -> None:
    vid = _committed(store)
    result = store.export(vid, tmp_path / "out")
    assert sorted(result.files) == sorted([SINGLE_FILE, PROVENANCE_FILE, "README.md"])
    loaded = load_file(tmp_path / "out" / SINGLE_FILE)
    want = store.materialize(vid)
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    assert json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["id"] == vid
    assert result.total_bytes == sum(t.numel() * t.element_size() for t in want.values())


def test_sharded_export_has_an_index_covering_every_tensor(store: ModelStore, tmp_path: Path) -> None:
    vid = _committed(store)
    store.export(vid, tmp_path / "out", max_shard_bytes=256)
    out = tmp_path / "out"
    index = json.loads((out / INDEX_FILE).read_text())
    want = store.materialize(vid)
    assert set(index["weight_map"]) == set(want)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") for s in shards)
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        loaded.update(part)
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())


def test_export_refuses_a_non_empty_target_and_leaves_nothing_behind(
    store: ModelStore, tmp_path: Path
) -> None:
    vid = _committed(store)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        store.export(vid, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]  # no staging dir left
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="format 'onnx'"):
        store.export(vid, tmp_path / "o2", format="onnx")


def test_plan_shards_is_greedy_and_keeps_order() -> None:
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    plan = plan_shards(specs, max_shard_bytes=80)
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    with pytest.raises(ConfigError):
        plan_shards(specs, 0)


def test_exported_weights_load_into_a_transformers_model(store: ModelStore, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    root = store.commit_base(weights, name="tiny-gpt2")
    delta = {k: torch.full_like(v, 0.01) for k, v in weights.items() if v.is_floating_point()}
    v = commit_delta(store, delta, root.id, 1)
    store.export(v.id, tmp_path / "hf", max_shard_bytes=4096)
    config.save_pretrained(tmp_path / "hf")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    got = loaded.state_dict()["transformer.wte.weight"]
    assert torch.allclose(got, weights["transformer.wte.weight"] + 0.01, atol=1e-6)


def test_peft_export_refactorises_the_summed_delta(store: ModelStore, tmp_path: Path) -> None:
    from fedmerge.delta.lora import LoraTruncationWarning, load_peft_adapter, lora_to_delta

    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    d1, d2 = tiny_delta(base, 1), tiny_delta(base, 2)
    v = commit_delta(store, d2, commit_delta(store, d1, root.id, 1).id, 2)
    full = store.export(v.id, tmp_path / "full-rank", format="peft", rank=6)
    assert full.extra["max_relative_residual"] < 1e-5
    assert sorted(full.extra["skipped"]) == ["block.0.bias"]
    assert full.extra["rank"] <= 6 and full.extra["exact_rank"] == full.extra["rank"]
    exact = store.export(v.id, tmp_path / "exact", format="peft")  # default: the exact rank
    assert exact.extra["max_relative_residual"] < 1e-5 and exact.extra["rank"] == full.extra["exact_rank"]
    dense = lora_to_delta(load_peft_adapter(tmp_path / "full-rank"))
    for name in ("embed.weight", "block.0.weight", "head.weight"):
        assert torch.allclose(dense[name], (d1[name] + d2[name]).float(), atol=1e-5), name
    with pytest.warns(LoraTruncationWarning, match="below the exact rank"):
        low = store.export(v.id, tmp_path / "rank-1", format="peft", rank=1)
    assert 0 < low.extra["max_relative_residual"] < 1 and 0 < low.extra["total_residual"] < 1
    with pytest.raises(ConfigError, match="full-weights root"):
        store.export(root.id, tmp_path / "root", format="peft", rank=2)
