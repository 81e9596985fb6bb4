"""Recipe schema: the YAML keys mergekit's ``MergeConfiguration`` accepts, parsed and validated into
typed dataclasses (nothing is opened here), and the recipe errors.

See :mod:`fedmerge.recipes` for the format and docs/merging.md for what is supported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from fedmerge.errors import ConfigError
from fedmerge.recipes.parameters import Conditional, Scalar, Setting

STORE_PREFIX = "store:"
ADAPTER_CONFIG = "adapter_config.json"
HF_CONFIG = "config.json"


# ------------------------------------------------------------------------------------------ errors
class RecipeError(ConfigError):
    """A recipe cannot be run as written; nothing was read beyond headers and nothing was committed."""


class RecipeSchemaError(RecipeError):
    """Unknown or malformed keys, or a value of the wrong type."""


class UnsupportedMethodError(RecipeError):
    """The merge method is unknown, not implemented by fedmerge, or its aggregator is not registered."""


class RecipeParameterError(RecipeError):
    """A parameter is unknown for the method, out of range, or given per model where it is global."""


class RecipeModelError(RecipeError):
    """A model is missing, unreadable, or its tensors disagree with the others (names, shapes, dtypes)."""


class SliceError(RecipeError):
    """A slice's layer range is empty or beyond its model's layers, or the slices' layers disagree."""


# ------------------------------------------------------------------------------------------ schema
TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
}
UNSUPPORTED_KEYS = {
    "modules": "per-module recipes (multimodal models) are not supported; merge each module separately",
}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a store version, a Hugging Face directory, or a base plus an adapter."""

    raw: str
    kind: Literal["store", "hf", "adapter"]
    path: Path | None = None  # hf directory, or the base directory of ``A+B``
    adapter: Path | None = None
    store_ref: str | None = None  # the id or alias after ``store:``
    base: ModelRef | None = None  # the base of an adapter (``A+B`` or the recipe's base_model)

    def __str__(self) -> str:
        return self.raw


@dataclass(frozen=True)
class InputModel:
    model: ModelRef
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    sources: list[SliceSource]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenRule:
    """One entry of the ``tokenizer:`` block's ``tokens`` (mergekit's ``TokenEmbeddingConfig``): where
    the token's embedding row comes from — ``kind`` ``model`` (that model's row of the same token),
    ``model_token`` (that model's row of another token, by ``token`` or ``token_id``) or ``zero`` — and
    whether it replaces the row every model already has (``force``)."""

    kind: Literal["model", "model_token", "zero", "none"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerBlock:
    """mergekit's ``tokenizer:`` block: ``source`` (``union``, ``base`` or a model), per-token rules,
    and ``pad_to_multiple_of`` (the vocabulary tensors' rows rounded up; new rows are the mean row)."""

    source: str = "union"
    tokens: dict[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (schema level: keys, types, references parsed; nothing opened yet)."""

    merge_method: str
    base_model: ModelRef | None
    models: list[InputModel]
    slices: list[Slice]
    parameters: dict[str, Setting]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    chat_template: str | None
    raw: dict[str, Any]
    source: str = "<recipe>"
    tokenizer: TokenizerBlock | None = None


def _where(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RecipeSchemaError(f"{where or 'the recipe'} must be a mapping, got {type(obj).__name__}")
    bad = sorted(str(k) for k in obj if k not in allowed)
    if bad:
        raise RecipeSchemaError(
            f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(repr(b) for b in bad)} in "
            f"{where or 'the recipe'}; allowed: {', '.join(sorted(allowed))}"
        )
    return obj


def _scalar(v: Any, where: str) -> Scalar:
    if not isinstance(v, bool | int | float | str):
        raise RecipeSchemaError(f"{where} must be a number, boolean or string, got {v!r}")
    return v


def _setting(v: Any, where: str) -> Setting:
    """A scalar, a gradient (list of scalars) or conditional values (``{filter, value}`` or a list)."""
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        return _scalar(v, where)
    if all(not isinstance(e, dict) for e in v):
        return tuple(_scalar(e, f"{where}[{i}]") for i, e in enumerate(v))
    conds: list[Conditional] = []
    for i, e in enumerate(v):
        w = f"{where}[{i}]"
        if not isinstance(e, dict) or "value" not in e or set(e) - {"value", "filter"}:
            raise RecipeSchemaError(
                f"{w} must be a conditional value {{filter: NAME-SUBSTRING, value: ...}} (filter optional), "
                f"got {e!r}"
            )
        f = e.get("filter")
        if f is not None and not isinstance(f, str):
            raise RecipeSchemaError(f"{w}.filter must be a string (a substring of tensor names), got {f!r}")
        value = e["value"]
        if isinstance(value, list):
            inner: Scalar | tuple[Scalar, ...] = tuple(
                _scalar(x, f"{w}.value[{k}]") for k, x in enumerate(value)
            )
        else:
            inner = _scalar(value, f"{w}.value")
        conds.append(Conditional(inner, f))
    return tuple(conds)


def _parameters(obj: Any, where: str) -> dict[str, Setting]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise RecipeSchemaError(f"{where} must be a mapping of parameter names to values")
    out: dict[str, Setting] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise RecipeSchemaError(f"{where} has a non-string key {k!r}")
        out[k] = _setting(v, _where(where, k))
    return out


def parse_model_ref(raw: Any, where: str, root: Path) -> ModelRef:
    """Parse one model reference (module docstring); paths are made absolute against ``root``."""
    if isinstance(raw, dict) and "model" in raw and set(raw) <= {"model", "lora", "override_architecture"}:
        raise RecipeSchemaError(f"{where}: structured model references are not supported; write PATH or A+B")
    if not isinstance(raw, str) or not raw.strip():
        raise RecipeSchemaError(f"{where} must be a model reference string, got {raw!r}")
    text = raw.strip()
    if text.startswith(STORE_PREFIX):
        ref = text[len(STORE_PREFIX) :]
        if not ref:
            raise RecipeSchemaError(
                f"{where}: {text!r} names no version; write store:v000003 or store:latest"
            )
        return ModelRef(text, "store", store_ref=ref)
    if "+" in text and not (root / text).exists():
        base_text, adapter_text = text.split("+", 1)
        base = parse_model_ref(base_text, where, root)
        if base.kind == "adapter":
            raise RecipeSchemaError(f"{where}: the base of {text!r} is itself an adapter")
        return ModelRef(text, "adapter", adapter=(root / adapter_text).resolve(), base=base)
    path = (root / text).resolve()
    if (path / ADAPTER_CONFIG).is_file() and not (path / HF_CONFIG).is_file():
        return ModelRef(text, "adapter", adapter=path)  # merged into the recipe's base_model
    return ModelRef(text, "hf", path=path)


def read_recipe_text(path: Path) -> str:
    """The text of the recipe file ``path``; a file that cannot be read is a :class:`RecipeError`."""
    try:
        return path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None


def parse_recipe(data: str | os.PathLike[str] | Mapping[str, Any], *, root: Path | None = None) -> Recipe:
    """Validate a recipe's schema. ``data`` is a YAML file path or an already-loaded mapping.

    Raises a :class:`RecipeError` subclass naming the first problem; opens no model.
    """
    source = "<recipe>"
    if isinstance(data, str | os.PathLike):
        p = Path(data)
        source = str(p)
        text = read_recipe_text(p)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeSchemaError(f"{p} is not valid YAML: {exc}") from None
        root = root or p.resolve().parent
    else:
        loaded = dict(data)
    root = root or Path.cwd()
    for key, why in UNSUPPORTED_KEYS.items():
        if isinstance(loaded, dict) and key in loaded:
            raise RecipeSchemaError(f"key {key!r}: {why}")
    doc = _check_keys(loaded, TOP_KEYS, "")
    method = doc.get("merge_method")
    if not isinstance(method, str) or not method:
        raise RecipeSchemaError("the recipe needs merge_method (e.g. ties, linear, passthrough)")
    base = (
        parse_model_ref(doc["base_model"], "base_model", root) if doc.get("base_model") is not None else None
    )
    models: list[InputModel] = []
    for i, m in enumerate(doc.get("models") or []):
        w = _where("models", i)
        if isinstance(m, str):
            m = {"model": m}
        m = _check_keys(m, MODEL_KEYS, w)
        if "model" not in m:
            raise RecipeSchemaError(f"{w} has no 'model'")
        models.append(
            InputModel(
                parse_model_ref(m["model"], f"{w}.model", root),
                _parameters(m.get("parameters"), f"{w}.parameters"),
            )
        )
    slices: list[Slice] = []
    for i, s in enumerate(doc.get("slices") or []):
        w = _where("slices", i)
        s = _check_keys(s, SLICE_KEYS, w)
        for unsupported in ("base_model", "residual_weight"):
            if s.get(unsupported) is not None:
                raise RecipeSchemaError(
                    f"{w}.{unsupported} is not supported; set base_model at the top level"
                )
        if not isinstance(s.get("sources"), list) or not s["sources"]:
            raise RecipeSchemaError(f"{w} needs a non-empty list 'sources'")
        sources = []
        for j, src in enumerate(s["sources"]):
            ws = _where(f"{w}.sources", j)
            src = _check_keys(src, SOURCE_KEYS, ws)
            if "model" not in src or "layer_range" not in src:
                raise RecipeSchemaError(f"{ws} needs 'model' and 'layer_range'")
            lr = src["layer_range"]
            if (
                not isinstance(lr, list | tuple)
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            ):
                raise SliceError(f"{ws}.layer_range must be two integers [start, end), got {lr!r}")
            if not 0 <= lr[0] < lr[1]:
                raise SliceError(
                    f"{ws}.layer_range {list(lr)} is empty or negative; write [start, end) with start < end"
                )
            sources.append(
                SliceSource(
                    parse_model_ref(src["model"], f"{ws}.model", root),
                    (int(lr[0]), int(lr[1])),
                    _parameters(src.get("parameters"), f"{ws}.parameters"),
                )
            )
        slices.append(Slice(sources, _parameters(s.get("parameters"), f"{w}.parameters")))
    if bool(models) == bool(slices):
        raise RecipeSchemaError(
            "give exactly one of 'models' and 'slices' (mergekit's rule), with at least one entry"
        )
    for key in ("dtype", "out_dtype"):
        v = doc.get(key)
        if v is not None and v not in DTYPES:
            raise RecipeSchemaError(f"{key} {v!r} is not one of {', '.join(sorted(DTYPES))}")
    tok = doc.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        raise RecipeSchemaError(f"tokenizer_source must be 'base', 'union' or a model reference, got {tok!r}")
    block = _tokenizer_block(doc["tokenizer"]) if doc.get("tokenizer") is not None else None
    if block is not None and tok is not None:
        raise RecipeSchemaError("give tokenizer_source or a tokenizer: block, not both (as mergekit)")
    chat = doc.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        raise RecipeSchemaError("chat_template must be a string")
    if base is not None and base.kind == "adapter" and base.base is None:
        raise RecipeSchemaError("base_model is a bare adapter; write BASE+ADAPTER")
    if base is not None:  # bare adapters are merged into the base
        models = [InputModel(_with_base(m.model, base), m.parameters) for m in models]
    for m in models:
        if m.model.kind == "adapter" and m.model.base is None:
            raise RecipeSchemaError(
                f"model {m.model.raw!r} is a peft adapter and the recipe has no base_model; "
                "write BASE+ADAPTER"
            )
    return Recipe(
        merge_method=method,
        base_model=base,
        models=models,
        slices=slices,
        parameters=_parameters(doc.get("parameters"), "parameters"),
        dtype=doc.get("dtype"),
        out_dtype=doc.get("out_dtype"),
        tokenizer_source=tok,
        chat_template=chat,
        tokenizer=block,
        raw=json.loads(json.dumps(doc, default=str)),
        source=source,
    )


def _token_rule(obj: Any, where: str) -> TokenRule:
    """``{source: MODEL | {kind: zero} | {kind: model_token, model, token | token_id}, force: bool}``."""
    obj = _check_keys(obj, {"source", "force"}, where)
    force = obj.get("force", False)
    if not isinstance(force, bool):
        raise RecipeSchemaError(f"{where}.force must be true or false, got {force!r}")
    src = obj.get("source")
    if src is None:
        return TokenRule("none", force=force)
    if isinstance(src, str):
        return TokenRule("model", model=src, force=force)
    w = f"{where}.source"
    kind = src.get("kind") if isinstance(src, dict) else None
    if kind == "zero":
        _check_keys(src, {"kind"}, w)
        return TokenRule("zero", force=force)
    if kind != "model_token":
        raise RecipeSchemaError(
            f"{w} must be a model, {{kind: zero}} or {{kind: model_token, model: M, token: T}}, got {src!r}"
        )
    src = _check_keys(src, {"kind", "model", "token", "token_id"}, w)
    model, token, token_id = src.get("model"), src.get("token"), src.get("token_id")
    if not isinstance(model, str):
        raise RecipeSchemaError(f"{w}.model must be a model reference, got {model!r}")
    if (token is None) == (token_id is None):
        raise RecipeSchemaError(f"{w} needs exactly one of token and token_id")
    if token is not None and not isinstance(token, str):
        raise RecipeSchemaError(f"{w}.token must be a string, got {token!r}")
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise RecipeSchemaError(f"{w}.token_id must be a non-negative integer, got {token_id!r}")
    return TokenRule("model_token", model=model, token=token, token_id=token_id, force=force)


def _tokenizer_block(obj: Any) -> TokenizerBlock:
    obj = _check_keys(obj, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer")
    source = obj.get("source", "union")
    if not isinstance(source, str) or not source:
        raise RecipeSchemaError(
            f"tokenizer.source must be 'union', 'base' or a model reference, got {source!r}"
        )
    pad = obj.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeSchemaError(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = obj.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise RecipeSchemaError("tokenizer.tokens must be a mapping of token → {source, force}")
    rules = {}
    for token, rule in tokens.items():
        if not isinstance(token, str):
            raise RecipeSchemaError(f"tokenizer.tokens has a non-string token {token!r}")
        rules[token] = _token_rule(rule, f"tokenizer.tokens[{token!r}]")
    return TokenizerBlock(source, rules, pad)


def _with_base(ref: ModelRef, base: ModelRef) -> ModelRef:
    if ref.kind == "adapter" and ref.base is None:
        return ModelRef(
            ref.raw, "adapter", adapter=ref.adapter, base=base.base if base.kind == "adapter" else base
        )
    return ref
