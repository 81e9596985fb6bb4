"""``merge_method: karcher`` in a mergekit recipe over real Hugging Face directories, against mergekit's
formula (the loop port in tests/aggregators/test_karcher.py) applied tensor by tensor to the weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from fedmerge.delta.hf import load_hf_state_dict  # noqa: E402
from fedmerge.recipes import run_recipe  # noqa: E402
from fedmerge.store import ModelStore  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "karcher_reference", Path(__file__).resolve().parents[1] / "aggregators" / "test_karcher.py"
)
assert _spec is not None and _spec.loader is not None
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)


def test_karcher_recipe_matches_mergekit(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    base = transformers.LlamaForCausalLM(cfg).state_dict()
    dirs = []
    for i in range(3):
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict(
            {k: v + 0.05 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        )
        m.save_pretrained(str(tmp_path / f"ft{i}"))
        dirs.append(tmp_path / f"ft{i}")
    recipe = {
        "merge_method": "karcher",
        "models": [{"model": str(d)} for d in dirs],
        "parameters": {"max_iter": 20, "tol": 1e-6},
        "dtype": "float32",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run_recipe(tmp_path / "r.yaml", tmp_path / "store")
    thetas = [load_hf_state_dict(d) for d in dirs]
    with ModelStore.open(tmp_path / "store") as st:
        got = st.materialize(result.version)
        assert st.get(result.version).params["aggregator"] == "karcher"
    for k in thetas[0]:
        want = _ref.mk_karcher([t[k] for t in thetas], [1 / 3] * 3, max_iter=20, tol=1e-6)
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-5)
