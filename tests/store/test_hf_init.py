"""``fedmerge init`` from real Hugging Face model directories, and exports that transformers/peft load.

Every model is built from a config with transformers and saved with ``save_pretrained`` (sharded with
``max_shard_size``); the tokenizer is a word-level ``tokenizers`` model built from a fixed vocabulary.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from store_test_helpers import contributor

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fedmerge.delta import hf  # noqa: E402
from fedmerge.errors import InvalidSubmission  # noqa: E402
from fedmerge.store import ModelStore  # noqa: E402
from fedmerge.store.cli import app  # noqa: E402
from fedmerge.store.init import AdapterBaseMismatchError, StoreNotEmptyError, init_store  # noqa: E402
from fedmerge.submission import checkpoint_to_task_vector  # noqa: E402

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"]


def llama_config(**overrides: Any) -> Any:
    kw: dict[str, Any] = dict(
        vocab_size=len(WORDS) + 6,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.save_pretrained(str(directory))


def save_llama(
    directory: Path, *, dtype: torch.dtype = torch.float32, shard: str | None = "30KB", **cfg: Any
) -> Any:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(**cfg)).to(dtype)
    if shard is None:
        model.save_pretrained(str(directory))
    else:
        model.save_pretrained(str(directory), max_shard_size=shard)
    save_tokenizer(directory)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_llama(d)
    assert (d / hf.SAFE_INDEX).is_file(), "the fixture must be sharded"
    return d


def state_of(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def commit_round(store: ModelStore, parent: str, delta: dict[str, torch.Tensor], r: int) -> str:
    return store.commit(
        delta,
        parents=[parent],
        method="ties",
        params={"density": 0.2, "lambda": 1.0},
        contributors=[contributor(1), contributor(2, accepted=False)],
        round=r,
        metrics={"val_loss": 0.25 * r},
        privacy=None,
    ).id


# --------------------------------------------------------------------------------------- loading


def test_load_hf_state_dict_reads_every_shard(llama_dir: Path) -> None:
    state = hf.load_hf_state_dict(llama_dir)
    want = state_of(transformers.LlamaForCausalLM.from_pretrained(str(llama_dir)))
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert len(hf.weight_files(llama_dir)) > 1


def test_an_hf_directory_is_a_checkpoint_submission(llama_dir: Path, tmp_path: Path) -> None:
    base = hf.load_hf_state_dict(llama_dir)
    ft = {k: v + 0.5 for k, v in base.items()}
    out = tmp_path / "ft"
    model = transformers.LlamaForCausalLM.from_pretrained(str(llama_dir))
    model.load_state_dict(ft)
    model.save_pretrained(str(out), max_shard_size="20KB")
    tau = checkpoint_to_task_vector(out, base)
    assert tau.keys() == base.keys() and all(
        torch.allclose(tau[k], torch.full_like(tau[k], 0.5)) for k in tau
    )
    shutil.copytree(llama_dir, tmp_path / "broken")
    shard = sorted((tmp_path / "broken").glob("model-0000*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(InvalidSubmission, match=shard.name):
        checkpoint_to_task_vector(tmp_path / "broken", base)


# --------------------------------------------------------------------------------------- init + export


def test_every_export_loads_with_from_pretrained(llama_dir: Path, tmp_path: Path) -> None:
    with ModelStore.open(tmp_path / "store") as store:
        result = init_store(store, llama_dir)
        assert result.architecture == "LlamaForCausalLM" and result.architecture_checked
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
            result.files
        )
        root = result.root
        base = store.materialize(root.id)
        g = torch.Generator().manual_seed(7)
        v = root.id
        for r in (1, 2):
            delta = {k: 0.01 * torch.randn(t.shape, generator=g) for k, t in base.items()}
            v = commit_round(store, v, delta, r)
        assert store.verify().ok
        for ref in (root.id, v):
            out = tmp_path / f"export-{ref}"
            store.export(ref, out, max_shard_bytes=20_000)
            assert (out / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
            model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
            want = store.materialize(ref)
            got = state_of(model)
            assert all(torch.equal(got[k], want[k]) for k in want), ref
            tok = transformers.AutoTokenizer.from_pretrained(str(out))
            ids = tok("the cat sat", return_tensors="pt")["input_ids"]
            assert ids.tolist() == [[3, 4, 5]]
            generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert generated.shape == (1, 6)
        card = (tmp_path / f"export-{v}" / "README.md").read_text()
        for needle in (v, root.id, "ties", '"density": 0.2', "client-1", "client-2", "val_loss", "| no |"):
            assert needle in card, needle


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_keep_their_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    d = tmp_path / "half"
    save_llama(d, dtype=dtype, shard=None)
    with ModelStore.open(tmp_path / "store") as store:
        root = init_store(store, d).root
        assert {e.dtype for e in root.tensors.values()} == {"BF16" if dtype == torch.bfloat16 else "F16"}
        delta = {k: torch.full(e.shape, 0.125) for k, e in root.tensors.items()}
        v = commit_round(store, root.id, delta, 1)
        store.export(v, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16" if dtype == torch.bfloat16 else "F16"}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto")
    assert model.dtype == dtype
    ref = hf.load_hf_state_dict(d)
    got = model.state_dict()["model.norm.weight"]
    assert torch.equal(got, (ref["model.norm.weight"].float() + 0.125).to(dtype))


def test_a_single_safetensors_file_is_a_base(llama_dir: Path, tmp_path: Path) -> None:
    state = hf.load_hf_state_dict(llama_dir)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "weights.safetensors"))
    with ModelStore.open(tmp_path / "store") as store:
        result = init_store(store, tmp_path / "weights.safetensors")
        assert not result.architecture_checked and result.files == []
        got = store.materialize("latest")
        assert all(torch.equal(got[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------- peft


def _peft_adapter(base_dir: Path, out: Path, targets: list[str], seed: int = 3) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(out))
    return pm


def test_init_with_a_peft_adapter_and_an_exact_attention_only_peft_export(
    llama_dir: Path, tmp_path: Path
) -> None:
    pm = _peft_adapter(llama_dir, tmp_path / "adapter", ["q_proj", "v_proj"])
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        want_logits = pm(ids).logits
    merged = state_of(pm.merge_and_unload())
    with ModelStore.open(tmp_path / "store") as store:
        result = init_store(store, llama_dir, adapter=tmp_path / "adapter")
        assert result.adapter is not None and store.resolve("latest") == result.adapter.id
        got = store.materialize("latest")
        assert all(torch.allclose(got[k], merged[k], atol=1e-6) for k in merged)
        export = store.export("latest", tmp_path / "peft-out", format="peft")
    cfg = json.loads((tmp_path / "peft-out" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]  # not the zero-delta mlp/o_proj/k_proj
    assert set(export.extra["skipped"].values()) >= {"zero"} and export.extra["max_relative_residual"] < 1e-5
    assert export.extra["rank"] == 4  # the exact rank of a rank-4 adapter's ΔW
    base = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft-out"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want_logits, atol=1e-4)
    assert "peft" in (tmp_path / "peft-out" / "README.md").read_text()


def test_a_full_gpt2_delta_exports_as_a_peft_adapter_peft_loads(tmp_path: Path) -> None:
    """Conv1D weights (fan_in_fan_out) and embeddings (lora_embedding_A/B) included."""
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=24, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    with ModelStore.open(tmp_path / "store") as store:
        root = init_store(store, tmp_path / "gpt2").root
        g = torch.Generator().manual_seed(1)
        delta = {k: 0.02 * torch.randn(e.shape, generator=g) for k, e in root.tensors.items()}
        v = commit_round(store, root.id, delta, 1)
        export = store.export(v, tmp_path / "adapter", format="peft")
        want = store.materialize(v)
    assert export.extra["max_relative_residual"] < 1e-5
    assert all(why == "not 2-D" for why in export.extra["skipped"].values())
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2"))
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    got = merged.state_dict()
    for name, w in want.items():
        if w.dim() == 2:
            assert torch.allclose(got[name], w, atol=1e-5), name


# --------------------------------------------------------------------------------------- bad input


def _refused(store_path: Path, call: Callable[[], object], error: type[Exception], *needles: str) -> None:
    with pytest.raises(error) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    with ModelStore.open(store_path) as store:
        assert store.list() == [] and store.verify().ok


def test_bad_bases_and_adapters_are_refused_with_one_clear_error(llama_dir: Path, tmp_path: Path) -> None:
    s = tmp_path / "store"
    no_config = tmp_path / "no-config"
    shutil.copytree(llama_dir, no_config)
    (no_config / "config.json").unlink()
    _refused(s, lambda: init_store(s, no_config), hf.MissingConfigError, "config.json", str(no_config))

    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    shutil.copy(llama_dir / "config.json", bin_only)
    torch.save(hf.load_hf_state_dict(llama_dir), bin_only / "pytorch_model.bin")
    _refused(
        s,
        lambda: init_store(s, bin_only),
        hf.UnsupportedWeightsError,
        "pytorch_model.bin",
        "safe_serialization",
    )

    other = tmp_path / "other-config"
    shutil.copytree(llama_dir, other)
    llama_config(intermediate_size=64).save_pretrained(str(other))  # config of another width
    (other / "config.json").write_text(
        json.dumps({**json.loads((other / "config.json").read_text()), "architectures": ["LlamaForCausalLM"]})
    )
    _refused(s, lambda: init_store(s, other), hf.ArchitectureMismatchError, "mlp", "shape")

    small = tmp_path / "small"
    save_llama(small, shard=None, hidden_size=16, intermediate_size=24)
    _peft_adapter(small, tmp_path / "foreign-adapter", ["q_proj"])
    _refused(
        s,
        lambda: init_store(s, llama_dir, adapter=tmp_path / "foreign-adapter"),
        AdapterBaseMismatchError,
        "q_proj",
        "(32, 32)",
    )
    _refused(s, lambda: init_store(s, tmp_path / "foreign-adapter"), AdapterBaseMismatchError, "--adapter")

    with ModelStore.open(s) as store:
        init_store(store, llama_dir)
        with pytest.raises(StoreNotEmptyError, match="already has versions"):
            init_store(store, llama_dir)
        assert len(store.list()) == 1


def test_kept_files_are_verified_and_survive_gc(llama_dir: Path, tmp_path: Path) -> None:
    with ModelStore.open(tmp_path / "store") as store:
        root = init_store(store, llama_dir).root
        assert store.gc(grace_seconds=0).removed_blobs == []
        assert store.read_files(root.id)["config.json"] == (llama_dir / "config.json").read_bytes()
        blob = store.blobs.local_path(root.files["config.json"].blob)
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[-2] ^= 0xFF
        blob.write_bytes(bytes(data))
        report = store.verify()
        assert not report.ok and any("file 'config.json'" in p.message for p in report.problems)


def test_cli_init_then_export(llama_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    store = tmp_path / "store"
    res = runner.invoke(app, ["init", "--store", str(store), "--base", str(llama_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["latest"] == "v000001"
    res = runner.invoke(app, ["export", "latest", "--store", str(store), "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "x"))
    from fedmerge.cli import app as main_app  # `fedmerge init` is the same command at the top level

    top = runner.invoke(
        main_app, ["init", "--store", str(tmp_path / "s3"), "--base", str(llama_dir), "--json"]
    )
    assert top.exit_code == 0, top.output
    bad = runner.invoke(app, ["init", "--store", str(tmp_path / "s2"), "--base", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "does not exist" in " ".join(bad.output.split())
    assert not (tmp_path / "s2").exists()  # nothing written for a refused base
