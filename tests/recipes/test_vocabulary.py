"""The vocabulary surgery (``fedmerge.recipes.vocabulary``) against a plain reference of mergekit's
rules, on the fixture models with different tokenizers, where mergekit 0.1.5 itself cannot serve as
the reference: ``tokenizer: {source: base}`` with a token the base lacks (mergekit fails there: its
``add_tokens`` changes the base's own tokenizer object)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmerge.recipes import run_recipe

transformers = pytest.importorskip("transformers")

VOCAB = Path(__file__).resolve().parent.parent / "fixtures" / "mergekit" / "models" / "vocab"


def _ids(model: Path) -> dict[str, int]:
    data = json.loads((model / "tokenizer.json").read_text())
    return dict(data["model"]["vocab"]) | {a["content"]: a["id"] for a in data["added_tokens"]}


def _reference_rows(
    out_ids: dict[str, int],
    models: dict[str, Path],
    base: str,
    rules: dict[str, tuple[str | None, bool]],
    key: str,
) -> dict[str, torch.Tensor]:
    """Each model's tensor ``key`` rebuilt token by token: own row unless forced or missing; a default
    row from the rule (model or zero), else the only model that has it, zero, the base's, the average."""
    ids = {m: _ids(p) for m, p in models.items()}
    tensors = {m: load_file(str(p / "model.safetensors"))[key] for m, p in models.items()}
    out = {m: torch.zeros(len(out_ids), tensors[m].shape[1]) for m in models}
    for token, tid in out_ids.items():
        have = [m for m in models if token in ids[m]]
        source, force = rules.get(token, (None, False))
        if token in rules:
            default = (
                torch.zeros(tensors[base].shape[1]) if source is None else tensors[source][ids[source][token]]
            )
        elif len(have) == 1:
            default = tensors[have[0]][ids[have[0]][token]]
        elif not have:
            default = torch.zeros(tensors[base].shape[1])
        elif base in have:
            default = tensors[base][ids[base][token]]
        else:
            default = sum(tensors[m][ids[m][token]] for m in have) / len(have)
        for m in models:
            out[m][tid] = tensors[m][ids[m][token]] if token in ids[m] and not force else default
    return out


def test_base_tokenizer_with_new_tokens_matches_the_plain_reference(tmp_path: Path) -> None:
    models = {"base": VOCAB / "base", "chatml": VOCAB / "chatml", "llama3": VOCAB / "llama3"}
    weights = {"chatml": 0.7, "llama3": 0.4}
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[m]), "parameters": {"weight": w}} for m, w in weights.items()],
        "tokenizer": {
            "source": "base",
            "tokens": {
                "<|eot_id|>": {"source": str(models["llama3"])},
                "brand-new": {"source": {"kind": "zero"}},
                "fox": {"source": str(models["chatml"]), "force": True},
            },
        },
        "dtype": "float32",
    }
    run_recipe(recipe, tmp_path / "store", export=tmp_path / "out")
    base_ids = _ids(models["base"])
    want_ids = base_ids | {"<|eot_id|>": len(base_ids), "brand-new": len(base_ids) + 1}
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.get_vocab() == want_ids
    assert tok("fox brand-new <|eot_id|>").input_ids == [want_ids["fox"], len(base_ids) + 1, len(base_ids)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(want_ids)
    got = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    rules = {"<|eot_id|>": ("llama3", False), "brand-new": (None, False), "fox": ("chatml", True)}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = _reference_rows(want_ids, models, "base", rules, key)
        want = rows["base"] + sum(w * (rows[m] - rows["base"]) for m, w in weights.items())
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-7)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model(torch.tensor([[0, len(base_ids) + 1]])).logits.shape == (1, 2, len(want_ids))


def test_models_with_different_tokenizers_commit_a_new_root_with_the_output_tokenizer(tmp_path: Path) -> None:
    """The merged version carries the output vocabulary's tokenizer files (the store's export writes
    them), not the base's."""
    from fedmerge.store import ModelStore

    recipe = {
        "merge_method": "linear",
        "models": [str(VOCAB / m) for m in ("base", "chatml", "llama3")],
        "tokenizer_source": "union",
    }
    result = run_recipe(recipe, tmp_path / "store")
    assert result.kind == "full" and result.parents == []
    with ModelStore.open(tmp_path / "store") as s:
        s.export(result.version, tmp_path / "out")
    vocab = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    assert set(vocab) == set(_ids(VOCAB / "base")) | set(_ids(VOCAB / "chatml")) | set(_ids(VOCAB / "llama3"))


def test_forced_zero_rows_need_no_donor(tmp_path: Path) -> None:
    """A block whose only rule is a forced zero (no model's row needed): that token's rows are zero in
    the merge, the others the models' merged rows, padding the mean row."""
    models = [VOCAB.parent / m for m in ("a", "b")]
    recipe = {
        "merge_method": "linear",
        "models": [str(m) for m in models],
        "tokenizer": {"source": "base", "tokens": {"fox": {"source": {"kind": "zero"}, "force": True}}},
        "dtype": "bfloat16",
    }
    run_recipe(recipe, tmp_path / "store", export=tmp_path / "out")
    got = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    fox, n = _ids(models[0])["fox"], len(_ids(models[0]))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = [load_file(str(m / "model.safetensors"))[key][:n].bfloat16().float() for m in models]
        want = (rows[0] + rows[1]) / 2
        want[fox] = 0
        assert got[key].shape[0] == n and not got[key][fox].any()
        torch.testing.assert_close(got[key].float(), want.bfloat16().float(), rtol=1e-2, atol=1e-4)
