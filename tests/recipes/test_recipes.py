"""``fedmerge merge RECIPE.yaml``: mergekit recipes over real Hugging Face directories and store versions.

Every model is a tiny Llama built from a transformers config and saved with ``save_pretrained``
(nothing is downloaded); fine-tuned models are the base plus seeded noise. Each method's result is
compared with a plain-torch reference of mergekit's formula (mergekit at commit a6e4028, 2026-06-17,
released as 0.1.4: ``merge_methods/linear.py``, ``generalized_task_arithmetic.py``, ``sparsify.py``,
``passthrough.py``) on the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from fedmerge.cli import main  # noqa: E402
from fedmerge.delta.hf import load_hf_state_dict  # noqa: E402
from fedmerge.recipes import (  # noqa: E402
    RecipeModelError,
    RecipeParameterError,
    RecipeSchemaError,
    SliceError,
    UnsupportedMethodError,
    run_recipe,
)
from fedmerge.store import ModelStore  # noqa: E402

State = dict[str, torch.Tensor]


def llama(layers: int = 2) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft0..ft2 (base + seeded noise of different scales), other (another 3-layer model)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = llama()
    base.save_pretrained(str(root / "base"))
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        ft = llama()
        ft.load_state_dict(
            {k: v + (0.01 * (i + 1)) * torch.randn(v.shape, generator=g) for k, v in state.items()}
        )
        ft.save_pretrained(str(root / f"ft{i}"), max_shard_size="40KB" if i == 0 else "5GB")
    llama(3).save_pretrained(str(root / "other"))
    return {p.name: p for p in root.iterdir()}


def write(tmp: Path, recipe: dict[str, Any]) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def loaded(directory: Path) -> State:
    """The exported directory through transformers itself."""
    m = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    return {k: v.detach() for k, v in m.state_dict().items()}


def assert_close(got: State, want: State) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), f"{k}: {(got[k] - want[k]).abs().max()}"


# ---------------------------------------------------------------- references: mergekit's formulas
def ref_linear(thetas: list[State], w: list[float], normalize: bool = True) -> State:
    out = {k: torch.stack([wi * t[k] for wi, t in zip(w, thetas, strict=True)]).sum(0) for k in thetas[0]}
    return {k: v / sum(w) for k, v in out.items()} if normalize else out


def ref_task_arithmetic(base: State, thetas: list[State], w: list[float], lam: float) -> State:
    return {
        k: base[k] + lam * sum(wi * (t[k] - base[k]) for wi, t in zip(w, thetas, strict=True)) for k in base
    }


def magnitude(x: torch.Tensor, density: float) -> torch.Tensor:  # mergekit.sparsify.magnitude
    if density >= 1:
        return x
    k = int(density * x.numel())
    mask = torch.zeros_like(x)
    mask.view(-1)[torch.argsort(x.abs().view(-1), descending=True)[:k]] = 1
    return x * mask


def ref_ties(
    base: State, thetas: list[State], w: list[float], density: float, lam: float, normalize: bool = True
) -> State:
    out = {}
    for k in base:
        deltas = torch.stack([magnitude(t[k] - base[k], density) for t in thetas])
        weights = torch.tensor(w).view(-1, *([1] * base[k].dim()))
        wd = deltas * weights
        majority = (wd.sum(0) >= 0).to(wd.dtype) * 2 - 1  # get_mask(method="sum")
        mask = wd.sign() == majority
        divisor = (weights * mask).sum(0)
        divisor[divisor == 0] = 1
        out[k] = base[k] + lam * (wd * mask).sum(0) / (divisor if normalize else 1)
    return out


# ------------------------------------------------------------------------------------- methods
def test_linear_matches_mergekit_and_exports(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["ft0"]), "parameters": {"weight": 0.5}},
            {"model": str(models["ft1"]), "parameters": {"weight": 0.3}},
            {"model": str(models["ft2"]), "parameters": {"weight": 0.2}},
        ],
        "dtype": "float32",
    }
    result = run_recipe(write(tmp_path, recipe), tmp_path / "store", export=tmp_path / "out")
    want = ref_linear([load_hf_state_dict(models[f"ft{i}"]) for i in range(3)], [0.5, 0.3, 0.2])
    assert_close(loaded(tmp_path / "out"), want)
    with ModelStore.open(tmp_path / "store") as s:
        v = s.get(result.version)
        assert v.method == "linear" and v.metadata["recipe"]["merge_method"] == "linear"
        assert v.params["aggregator"] == "task_arithmetic" and list(v.parents) == result.parents
        assert s.get(v.parents[0]).kind == "full"  # the root created from the first model
        assert s.aliases()["latest"] == v.id


def test_task_arithmetic_from_store_versions(models: dict[str, Path], tmp_path: Path) -> None:
    """The base and one model are store versions; the committed version's parents are those inputs."""
    store = tmp_path / "store"
    from fedmerge.store.init import init_store

    root = init_store(store, models["base"]).root.id
    first = run_recipe(
        write(tmp_path, {"merge_method": "linear", "base_model": f"store:{root}",
                         "models": [{"model": str(models["ft0"]), "parameters": {"weight": 1.0}}]}),
        store,
    )  # fmt: skip  # a store version equal to ft0
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": f"store:{root}",
        "models": [
            {"model": "store:latest", "parameters": {"weight": 0.7}},
            {"model": str(models["ft1"]), "parameters": {"weight": 0.4}},
        ],
        "parameters": {"lambda": 0.8},
    }
    result = run_recipe(write(tmp_path, recipe), store, export=tmp_path / "out")
    assert result.parents == [root, first.version]
    base = load_hf_state_dict(models["base"])
    want = ref_task_arithmetic(base, [load_hf_state_dict(models[f"ft{i}"]) for i in (0, 1)], [0.7, 0.4], 0.8)
    assert_close(loaded(tmp_path / "out"), want)
    with ModelStore.open(store) as s:
        assert_close(s.materialize(result.version), want)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_matches_mergekit(models: dict[str, Path], tmp_path: Path, density: float) -> None:
    w = [1.0, 0.6, 0.3]
    recipe = {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[f"ft{i}"]), "parameters": {"weight": w[i], "density": density}}
            for i in range(3)
        ],
        "parameters": {"lambda": 0.9, "int8_mask": True},
        "tokenizer_source": "base",
    }
    result = run_recipe(write(tmp_path, recipe), tmp_path / "store", export=tmp_path / "out")
    base = load_hf_state_dict(models["base"])
    want = ref_ties(base, [load_hf_state_dict(models[f"ft{i}"]) for i in range(3)], w, density, 0.9)
    assert_close(loaded(tmp_path / "out"), want)
    assert result.aggregator_params["divisor"] == "weight" and result.aggregator_params["density"] == density
    with ModelStore.open(tmp_path / "store") as s:  # the root is the base directory, found or created once
        root = s.get(result.parents[0])
        assert root.kind == "full" and root.metadata["source"] == "huggingface"


def test_ties_without_normalize_sums_the_agreeing_values(models: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's ``normalize: false``; refused with a message naming it where ``ties`` lacks the option."""
    w = [1.0, 0.5]
    recipe = _ties(models, parameters={"normalize": False, "lambda": 0.5})
    recipe["models"] = [
        {"model": str(models[f"ft{i}"]), "parameters": {"weight": w[i], "density": 0.4}} for i in (0, 1)
    ]
    try:
        run_recipe(write(tmp_path, recipe), tmp_path / "store", export=tmp_path / "out")
    except RecipeParameterError as exc:
        assert "normalize" in str(exc) and "refuses" in str(exc)
        pytest.skip(f"this fedmerge's ties has no normalize option: {exc}")
    base = load_hf_state_dict(models["base"])
    want = ref_ties(
        base, [load_hf_state_dict(models[f"ft{i}"]) for i in (0, 1)], w, 0.4, 0.5, normalize=False
    )
    assert_close(loaded(tmp_path / "out"), want)


def test_passthrough_frankenmerge_is_a_new_root(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models["ft0"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(models["ft1"]), "layer_range": [1, 2]}]},
        ],
    }
    result = run_recipe(write(tmp_path, recipe), tmp_path / "store", export=tmp_path / "out")
    a, b = load_hf_state_dict(models["ft0"]), load_hf_state_dict(models["ft1"])
    want = {k: v for k, v in a.items() if not k.startswith("model.layers.")}
    want |= {k.replace("model.norm", "model.norm"): b[k] for k in ("model.norm.weight", "lm_head.weight")}
    for k, v in a.items():
        if k.startswith("model.layers."):
            want[k] = v  # layers 0, 1 of ft0
        if k.startswith("model.layers.1."):
            want[k.replace("model.layers.1.", "model.layers.2.")] = b[k]  # layer 1 of ft1 → 2
    got = loaded(tmp_path / "out")
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).num_hidden_layers == 3
    assert_close(got, want)
    assert result.kind == "full" and result.parents == []


def test_passthrough_same_layout_is_a_delta(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "passthrough",
        "base_model": str(models["base"]),
        "slices": [
            {"sources": [{"model": str(models["ft0"]), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(models["ft1"]), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
        ],
    }
    result = run_recipe(write(tmp_path, recipe), tmp_path / "store", export=tmp_path / "out")
    a, b = load_hf_state_dict(models["ft0"]), load_hf_state_dict(models["ft1"])
    # as mergekit: the final norm and head come from the last slice's source, with its parameters (scale)
    want = {k: 0.5 * b[k] for k in b}
    want |= {k: v for k, v in a.items() if k.startswith("model.layers.0.") or "embed" in k}
    assert_close(loaded(tmp_path / "out"), want)
    assert result.kind == "task_vector" and len(result.parents) == 1


def test_cli_merges_and_reports_errors(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write(tmp_path, {"merge_method": "linear", "models": [str(models["ft0"]), str(models["ft1"])]})
    with pytest.raises(SystemExit) as ok:
        main(["merge", str(recipe), "--store", str(tmp_path / "s"), "--json"])
    assert ok.value.code in (0, None)
    assert '"version": "v000002"' in capsys.readouterr().out
    bad = write(tmp_path, {"merge_method": "frankenstein", "models": [str(models["ft0"])]})
    with pytest.raises(SystemExit) as err:
        main(["merge", str(bad), "--store", str(tmp_path / "s")])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "UnsupportedMethodError" in lines[0] and "available:" in lines[0]


# ------------------------------------------------------------------------------------ bad input
def _ties(paths: dict[str, Path], /, **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0, "density": 0.5}} for i in (0, 1)
        ],
    }
    r.update(over)
    return r


BAD: dict[str, tuple[Callable[[dict[str, Path]], dict[str, Any]], type[Exception], str]] = {
    "unknown top-level key": (lambda m: _ties(m, merge_methd="ties"), RecipeSchemaError, "'merge_methd'"),
    "unknown method": (lambda m: _ties(m, merge_method="nope"), UnsupportedMethodError, "available: "),
    "unknown parameter": (lambda m: _ties(m, parameters={"lamda": 1.0}), RecipeParameterError, "'lamda'"),
    "missing model": (
        lambda m: _ties(m, models=[{"model": str(m["base"].parent / "nowhere")}]),
        RecipeModelError, "nowhere"),
    "missing store version": (lambda m: _ties(m, base_model="store:v000042"), RecipeModelError, "v000042"),
    "different architecture": (
        lambda m: _ties(m, models=[{"model": str(m["other"])}]), RecipeModelError, "model.layers.2"),
    "negative density": (
        lambda m: _ties(m, models=[{"model": str(m["ft0"]), "parameters": {"density": -0.1}}]),
        RecipeParameterError, "density must be in [0.0, 1.0]"),
    "gradient value out of range": (
        lambda m: _ties(m, models=[{"model": str(m["ft0"]), "parameters": {"density": [0.5, 1.2]}}]),
        RecipeParameterError, "density must be in [0.0, 1.0]"),
    "t outside [0, 1]": (
        lambda m: {"merge_method": "slerp", "base_model": str(m["base"]), "models": [str(m["ft0"])],
                   "parameters": {"t": 1.5}}, RecipeParameterError, "t must be in [0.0, 1.0]"),
    "slice beyond the layers": (
        lambda m: {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(m["ft0"]),
                   "layer_range": [0, 3]}]}]}, SliceError, "which has 2 layers"),
    "ties trim keeping no entry": (  # mergekit's sparsify.magnitude asserts k > 0; refused from headers
        lambda m: _ties(m, parameters={"density": 0.01}, models=[str(m["ft0"]), str(m["ft1"])]),
        RecipeParameterError, "keeps ⌊0.01·32⌋ = 0"),
    "ties rescale": (
        lambda m: _ties(m, parameters={"rescale": True}), RecipeParameterError, "not reproduced"),
    "malformed conditional value": (
        lambda m: _ties(m, parameters={"lambda": [{"filtr": "mlp", "value": 1.0}]}), RecipeSchemaError,
        "conditional value"),
    "slice sources of unequal lengths": (
        lambda m: {"merge_method": "slerp", "base_model": str(m["base"]), "parameters": {"t": 0.5},
                   "slices": [{"sources": [{"model": str(m["base"]), "layer_range": [0, 2]},
                                           {"model": str(m["ft0"]), "layer_range": [0, 1]}]}]},
        SliceError, "same number of layers"),
    "models and slices": (
        lambda m: _ties(m, slices=[{"sources": [{"model": str(m["ft0"]), "layer_range": [0, 1]}]}]),
        RecipeSchemaError, "exactly one of"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_fail_before_anything_is_committed(
    models: dict[str, Path], tmp_path: Path, case: str
) -> None:
    make, error, fragment = BAD[case]
    store = tmp_path / "store"
    with ModelStore.open(store) as s:
        s.commit_base({"x": torch.zeros(2)}, name="unrelated")
    with pytest.raises(error) as info:
        run_recipe(write(tmp_path, make(models)), store, export=tmp_path / "out")
    assert fragment in str(info.value)
    with ModelStore.open(store) as s:
        assert [v.id for v in s.list()] == ["v000001"]
    assert not (tmp_path / "out").exists()


def test_dtype_mismatch_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    half = tmp_path / "half"
    transformers.AutoModelForCausalLM.from_pretrained(str(models["ft1"])).to(torch.bfloat16).save_pretrained(
        str(half)
    )
    with pytest.raises(RecipeModelError, match="bfloat16"):
        run_recipe(write(tmp_path, _ties(models, models=[str(models["ft0"]), str(half)])), tmp_path / "store")
    assert (
        not (tmp_path / "store" / "catalog.sqlite").exists() or not ModelStore.open(tmp_path / "store").list()
    )


def test_peft_adapter_is_merged_into_its_base(models: dict[str, Path], tmp_path: Path) -> None:
    """``BASE+ADAPTER`` and a bare adapter directory (merged into base_model) equal peft's merge."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(str(models["base"])),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(str(tmp_path / "adapter"))
    want = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    plus = f"{models['base']}+{tmp_path / 'adapter'}"
    run_recipe(
        write(tmp_path, {"merge_method": "linear", "models": [plus]}), tmp_path / "s1", export=tmp_path / "o1"
    )
    assert_close(loaded(tmp_path / "o1"), want)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}],
    }
    run_recipe(write(tmp_path, recipe), tmp_path / "s2", export=tmp_path / "o2")
    assert_close(loaded(tmp_path / "o2"), want)


def test_mapping_recipe_over_store_versions_with_irregular_layers(tmp_path: Path) -> None:
    """A recipe given as a mapping (not a file), over a model whose numbered layers hold different
    tensors (no layer position: every tensor at t = 0, the gradient's first value)."""
    with ModelStore.open(tmp_path / "s") as st:
        shapes = {"w": (4, 3), "net.layers.0.a": (2,), "net.layers.1.b": (5,)}
        base = st.commit_base({k: torch.zeros(v) for k, v in shapes.items()}, name="toy")
        g = torch.Generator().manual_seed(0)
        deltas = [{k: torch.randn(v, generator=g) for k, v in shapes.items()} for _ in range(2)]
        ids = [
            st.commit(d, parents=[base.id], method="x", params={}, contributors=[], round=None, metrics={},
                      privacy=None).id
            for d in deltas
        ]  # fmt: skip
        result = run_recipe(
            {
                "merge_method": "task_arithmetic",
                "base_model": f"store:{base.id}",
                "models": [{"model": f"store:{i}", "parameters": {"weight": [0.25, 1.0]}} for i in ids],
            },
            st,
        )
        merged = st.materialize(result.version)
    assert result.parents == [base.id, *ids]
    for k in shapes:
        torch.testing.assert_close(merged[k].float(), 0.25 * (deltas[0][k] + deltas[1][k]))
