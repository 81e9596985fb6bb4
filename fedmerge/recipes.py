"""mergekit-style YAML recipes: ``fedmerge merge RECIPE.yaml --store DIR [--export DIR]``.

A recipe is mergekit's ``MergeConfiguration`` (mergekit at commit a6e4028, 2026-06-17, released as
0.1.4; ``mergekit/config.py``)::

    merge_method: ties                     # mergekit's name (aggregators.mergekit.METHODS) or any aggregator
    base_model: store:v000001              # task-vector methods: τ_i = θ_i − θ_base
    models:
      - model: ./experts/math              # a Hugging Face model directory (safetensors)
        parameters: {weight: 1.0, density: 0.5}
      - model: store:prod                  # a store version by id or alias
        parameters: {weight: 0.5, density: 0.5}
      - model: ./base+./adapters/code      # mergekit's BASE+ADAPTER: a peft LoRA adapter merged into BASE
    parameters: {lambda: 1.0, normalize: true}
    dtype: float32                         # recorded (see below)
    tokenizer_source: base                 # recorded

or, for ``passthrough`` (layer slicing, "frankenmerges")::

    merge_method: passthrough
    slices:
      - sources: [{model: ./a, layer_range: [0, 2]}]
      - sources: [{model: ./b, layer_range: [1, 2]}]

**Model references.** ``store:ID`` or ``store:ALIAS`` (``store:v000003``, ``store:latest``) names a
version of the ``--store`` (its materialised weights); ``A+B`` is the base ``A`` with the peft LoRA
adapter ``B`` merged into it (ΔW = s·B·A, as mergekit's ``model+lora`` syntax); a bare adapter
directory (``adapter_config.json`` without ``config.json``) is merged into ``base_model``; anything
else is a Hugging Face model directory with safetensors weights. Paths are relative to the recipe's
directory.

**Methods.** Which aggregator implements a mergekit method, whether it gets task vectors or weights,
mergekit's parameters with their defaults and their fedmerge names all come from
:data:`fedmerge.aggregators.mergekit.METHODS` and :func:`~fedmerge.aggregators.mergekit.mergekit_params`
(the one table; docs/merging.md lists it): task-vector methods feed τ_i = θ_i − θ_base to the
aggregator with ``add(τ_i, weight=w_i)``; ``linear``, ``slerp``, ``karcher`` and ``multislerp`` feed
the weights θ_i themselves; ``passthrough`` copies (scaled) tensors. A method whose aggregator is not
registered is refused with the list of those that are. Any registered aggregator that mergekit does
not name (``iso_c``, ``magmax``, …) can be used by its registry name: it gets task vectors, per-model
``weight`` and its own parameters under ``parameters``.

**Streaming.** Every source is opened lazily (safetensors headers, store manifests); the merge runs
tensor by tensor: one aggregator per tensor name gets that tensor of every model, so memory is the
N input tensors of one name plus the merged model being committed (the store commits a state dict).

**Validation before any tensor is read** (one :class:`RecipeError` subclass, nothing committed):
unknown keys, methods or parameters; mergekit methods fedmerge does not implement; parameter values
fedmerge does not reproduce (``ties`` with ``rescale: true``, ``multislerp`` with
``normalize_weights: false``); missing models or store versions; models whose tensors disagree in
names, shapes or dtypes; ``t`` outside [0, 1]; densities outside [0, 1]; negative weights; per-model
values of a parameter the aggregator takes only globally (``density``, ``gamma``, ``epsilon``) that
differ; a ``ties`` density that keeps no entry of some tensor (mergekit asserts); slices beyond a
model's layers.

**Result.** A version whose first parent is the base (a store version, or the root of the store
created from — or found equal to — the base directory) and whose other parents are the inputs that
are store versions; the delta is θ_merged − θ_parent0. The recipe is in the manifest's ``metadata``
(``recipe``), the aggregator and its parameters in ``params``. A ``passthrough`` whose output has
another layout than the base (a different number of layers) cannot be a delta: it is committed as a
new root (``commit_base``) with ``config.json``'s layer count updated, and its inputs are recorded in
``metadata.derived_from`` (the store records parents only for deltas).

Deliberate differences from mergekit: the arithmetic is fp32 whatever ``dtype`` says (``dtype`` is
recorded; the output keeps the base's dtype, and an ``out_dtype`` other than that is refused);
``weight`` defaults to 1 (mergekit requires it); ``tokenizer_source`` is recorded but the exported
tokenizer is the base root's; per-layer gradients (lists) and ``filter`` conditions are refused;
slices with several sources are accepted only when every slice covers all layers of its models (then
they are the same as ``models``); stochastic methods (DARE, DELLA) draw their masks with
``torch.bernoulli`` as mergekit does, but from a generator per (``--seed``, model, tensor), not torch's
global one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fedmerge.aggregators.mergekit import (
    METHODS,
    NOT_IMPLEMENTED,
    MergekitMethod,
    MergekitParameterError,
    check_parameter,
    mergekit_params,
)
from fedmerge.errors import ConfigError, FedMergeError

Scalar = bool | int | float | str

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
    "chat_template",
    "name",
}
UNSUPPORTED_KEYS = {
    "modules": "per-module recipes (multimodal models) are not supported; merge each module separately",
    "tokenizer": "tokenizer surgery is not supported; use tokenizer_source (recorded) or omit it",
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
    parameters: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    sources: list[SliceSource]
    parameters: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (schema level: keys, types, references parsed; nothing opened yet)."""

    merge_method: str
    base_model: ModelRef | None
    models: list[InputModel]
    slices: list[Slice]
    parameters: dict[str, Scalar]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    chat_template: str | None
    raw: dict[str, Any]
    source: str = "<recipe>"


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


def _parameters(obj: Any, where: str) -> dict[str, Scalar]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise RecipeSchemaError(f"{where} must be a mapping of parameter names to values")
    out: dict[str, Scalar] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise RecipeSchemaError(f"{where} has a non-string key {k!r}")
        if isinstance(v, list | dict):
            raise RecipeParameterError(
                f"{_where(where, k)} is a {'gradient (list)' if isinstance(v, list) else 'filtered value'}; "
                "fedmerge takes one scalar per parameter (per-layer gradients and filters are not supported)"
            )
        if not isinstance(v, bool | int | float | str):
            raise RecipeSchemaError(f"{_where(where, k)} must be a number, boolean or string, got {v!r}")
        out[k] = v
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


def parse_recipe(data: str | os.PathLike[str] | Mapping[str, Any], *, root: Path | None = None) -> Recipe:
    """Validate a recipe's schema. ``data`` is a YAML file path or an already-loaded mapping.

    Raises a :class:`RecipeError` subclass naming the first problem; opens no model.
    """
    source = "<recipe>"
    if isinstance(data, str | os.PathLike):
        import yaml

        p = Path(data)
        source = str(p)
        try:
            text = p.read_text()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {p}: {exc.strerror or exc}") from None
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
        raw=json.loads(json.dumps(doc, default=str)),
        source=source,
    )


def _with_base(ref: ModelRef, base: ModelRef) -> ModelRef:
    if ref.kind == "adapter" and ref.base is None:
        return ModelRef(
            ref.raw, "adapter", adapter=ref.adapter, base=base.base if base.kind == "adapter" else base
        )
    return ref


# ----------------------------------------------------------------------------------------- methods
# mergekit's methods, their defaults and parameter renames live in fedmerge.aggregators.mergekit
# (METHODS, mergekit_params); this section only looks them up for a recipe.
def _check(name: str, value: Any) -> None:
    """Check one parameter value (fedmerge.aggregators.mergekit.PARAMETER_CHECKS) as a recipe error."""
    try:
        check_parameter(name, value)
    except MergekitParameterError as exc:
        raise RecipeParameterError(str(exc)) from None


def available_methods() -> list[str]:
    """Recipe method names that run with the aggregators registered now (mergekit's and fedmerge's)."""
    from fedmerge.aggregators import available

    registered = set(available())
    names = {m for m, s in METHODS.items() if s.aggregator is None or s.aggregator in registered}
    return sorted(names | (registered - set(METHODS)))


def method_spec(name: str) -> MergekitMethod:
    """The :class:`~fedmerge.aggregators.mergekit.MergekitMethod` for a recipe's ``merge_method``; a
    registered aggregator mergekit does not name gets task vectors, per-model ``weight`` and its own
    parameters. :class:`UnsupportedMethodError` if neither."""
    from fedmerge.aggregators import available

    registered = set(available())
    spec = METHODS.get(name)
    if spec is None and name in registered:  # a fedmerge aggregator mergekit does not name
        return MergekitMethod(name, "task_vector", {}, {"weight": 1.0}, needs_base=True)
    if spec is None or (spec.aggregator is not None and spec.aggregator not in registered):
        why = (
            f"mergekit's {name!r} is not implemented by fedmerge"
            if name in NOT_IMPLEMENTED
            else f"{name!r} is mergekit's but its aggregator {spec.aggregator!r} is not registered here"
            if spec is not None
            else f"unknown merge_method {name!r}"
        )
        raise UnsupportedMethodError(f"{why}; available: {', '.join(available_methods())}")
    return spec


# ----------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Spec:
    dtype: torch.dtype
    shape: tuple[int, ...]


class Source:
    """A model's tensors, opened lazily: :attr:`specs` from headers, :meth:`get` reads one tensor."""

    ref: ModelRef
    specs: dict[str, Spec]

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """Companion files (config.json, tokenizer files) of the model, if any."""
        return {}

    def close(self) -> None:
        pass


class HFSource(Source):
    """A Hugging Face model directory (memory-mapped safetensors)."""

    def __init__(self, ref: ModelRef) -> None:
        from fedmerge.delta import hf
        from fedmerge.store.safetensors_format import dtype_from_name

        assert ref.path is not None
        self.ref = ref
        if not ref.path.is_dir():
            raise RecipeModelError(f"model {ref.raw!r}: {ref.path} does not exist or is not a directory")
        try:
            self.ckpt = hf.HFCheckpoint(ref.path)
        except FedMergeError as exc:
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None
        try:
            self.specs = {n: Spec(dtype_from_name(i.dtype), i.shape) for n, i in self.ckpt.tensors.items()}
        except FedMergeError as exc:
            self.ckpt.close()
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name)

    def files(self) -> dict[str, bytes]:
        from fedmerge.delta import hf

        assert self.ref.path is not None
        return hf.companion_files(self.ref.path)

    def close(self) -> None:
        self.ckpt.close()


class StoreSource(Source):
    """The materialised weights of a store version, one tensor at a time (root + Σ first-parent deltas)."""

    def __init__(self, ref: ModelRef, store: Any) -> None:
        from fedmerge.store.errors import UnknownVersionError

        assert ref.store_ref is not None
        self.ref, self.store = ref, store
        try:
            self.version = store.get(ref.store_ref)
        except UnknownVersionError as exc:
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None
        self.chain = store.chain(self.version)
        bad = [v.id for v in self.chain[1:] if v.kind != "task_vector"]
        if bad:
            raise RecipeModelError(f"model {ref.raw!r} descends through {bad[0]}, which is not a task vector")
        self.specs = {s.name: Spec(s.dtype, tuple(s.shape)) for s in store.materialized_specs(self.version)}

    def get(self, name: str) -> torch.Tensor:
        from fedmerge.delta.state_dict import accumulation_dtype
        from fedmerge.store.blobs import read_blob

        root, deltas = self.chain[0], self.chain[1:]
        w = read_blob(self.store.blobs, root.tensors[name].blob, what=f"version {root.id} tensor {name!r}")
        if not w.is_floating_point() or not deltas:
            return w
        acc = w.to(accumulation_dtype(w.dtype))
        for d in deltas:
            acc += read_blob(
                self.store.blobs, d.tensors[name].blob, what=f"version {d.id} tensor {name!r}"
            ).to(acc.dtype)
        return acc.to(w.dtype)

    def files(self) -> dict[str, bytes]:
        return dict(self.store.read_files(self.version))


class AdapterSource(Source):
    """A base with a peft LoRA adapter merged in: θ = θ_base + s·B·A on the adapted weights."""

    def __init__(self, ref: ModelRef, base: Source) -> None:
        from fedmerge.delta.lora import load_peft_adapter

        assert ref.adapter is not None
        self.ref, self.base = ref, base
        self.specs = base.specs
        if not (ref.adapter / ADAPTER_CONFIG).is_file():
            raise RecipeModelError(
                f"model {ref.raw!r}: {ref.adapter} is not a peft adapter (no {ADAPTER_CONFIG})"
            )
        try:
            self.adapter = load_peft_adapter(ref.adapter)
        except FedMergeError as exc:
            raise RecipeModelError(f"model {ref.raw!r}: {exc}") from None
        if self.adapter.extra or not self.adapter.modules:
            raise RecipeModelError(
                f"model {ref.raw!r}: only adapters of linear LoRA factors are merged (no modules_to_save)"
            )
        for name, m in sorted(self.adapter.modules.items()):
            out_in = (int(m.B.shape[0]), int(m.A.shape[1]))
            shape = out_in[::-1] if self.adapter.fan_in_fan_out else out_in
            spec = self.specs.get(name)
            if spec is None or spec.shape != shape:
                raise RecipeModelError(
                    f"model {ref.raw!r}: the adapter's module {name!r} (ΔW {shape}) is not a weight of its "
                    f"base {base.ref.raw!r} ({'missing' if spec is None else spec.shape}); "
                    "pass the base it was trained on"
                )

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        m = self.adapter.modules.get(name)
        if m is None:
            return w
        d = m.delta()
        return (w.float() + (d.T if self.adapter.fan_in_fan_out else d)).to(w.dtype)

    def files(self) -> dict[str, bytes]:
        return self.base.files()


# -------------------------------------------------------------------------------------- layer maps
LAYER_RE = re.compile(r"^(?P<prefix>.+?\.(?:layers|h|layer|blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PRE_MARKERS = ("embed", "wte", "wpe")


def layer_template(specs: Mapping[str, Spec]) -> tuple[str | None, int, dict[str, Spec], dict[str, Spec]]:
    """(layer prefix, number of layers, rest → spec of one layer, non-layer specs) of a model's tensors."""
    prefixes: set[str] = set()
    per_layer: dict[int, dict[str, Spec]] = {}
    other: dict[str, Spec] = {}
    for name, spec in specs.items():
        m = LAYER_RE.match(name)
        if m is None:
            other[name] = spec
            continue
        prefixes.add(m["prefix"])
        per_layer.setdefault(int(m["idx"]), {})[m["rest"]] = spec
    if len(prefixes) != 1:
        return None, 0, {}, dict(specs)
    count = max(per_layer) + 1
    templates = [per_layer.get(i) for i in range(count)]
    if any(t != templates[0] for t in templates):
        raise SliceError("the model's layers do not all hold the same tensors; it cannot be sliced by layer")
    return prefixes.pop(), count, templates[0] or {}, other


# ------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Everything checked and resolved before the first tensor is read."""

    recipe: Recipe
    spec: MergekitMethod
    sources: dict[str, Source]
    base: Source | None
    inputs: list[tuple[Source, float]]  # (source, weight) of each merged model, recipe order
    agg_params: dict[str, Any]
    mergekit_params: dict[str, Any]
    per_model: list[dict[str, Any]]
    out_map: dict[str, tuple[Source, str, float | None]] = field(default_factory=dict)  # passthrough
    out_config: dict[str, Any] | None = None
    anchor: Source | None = None  # the source parents[0] materialises to
    notes: list[str] = field(default_factory=list)
    every: list[Source] = field(default_factory=list)  # every opened source (adapters' bases too)

    def close(self) -> None:
        for s in self.every:
            s.close()


def _open_sources(recipe: Recipe, store: Any) -> tuple[dict[str, Source], list[Source]]:
    """(recipe reference → source, every source opened, adapters' bases included)."""
    refs: list[ModelRef] = []
    if recipe.base_model is not None:
        refs.append(recipe.base_model)
    refs += [m.model for m in recipe.models] + [s.model for sl in recipe.slices for s in sl.sources]
    opened: dict[str, Source] = {}

    def open_ref(ref: ModelRef) -> Source:
        key = ref.raw if ref.kind != "adapter" else f"{ref.base.raw if ref.base else ''}+{ref.adapter}"
        if key in opened:
            return opened[key]
        src: Source
        if ref.kind == "store":
            src = StoreSource(ref, store)
        elif ref.kind == "hf":
            src = HFSource(ref)
        else:
            assert ref.base is not None
            src = AdapterSource(ref, open_ref(ref.base))
        opened[key] = src
        return src

    public: dict[str, Source] = {}
    try:
        for r in refs:
            public[r.raw] = open_ref(r)
    except BaseException:
        for s in opened.values():
            s.close()
        raise
    return public, list(opened.values())


def _check_same(sources: Sequence[Source], what: str) -> None:
    first = sources[0]
    for other in sources[1:]:
        a, b = first.specs, other.specs
        if a.keys() != b.keys():
            only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
            name, owner = (only_a[0], first) if only_a else (only_b[0], other)
            raise RecipeModelError(
                f"{what}: models {first.ref.raw!r} and {other.ref.raw!r} hold different tensors "
                f"({name!r} is only in {owner.ref.raw!r}); they are not the same architecture"
            )
        for n in sorted(a):
            if a[n] != b[n]:
                raise RecipeModelError(
                    f"{what}: tensor {n!r} is {a[n].dtype} {a[n].shape} in {first.ref.raw!r} but "
                    f"{b[n].dtype} {b[n].shape} in {other.ref.raw!r}; "
                    "merge models of one architecture and dtype"
                )


def _resolve_params(recipe: Recipe, spec: MergekitMethod) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check every parameter name and value; return (global parameters, per-model parameters)."""
    allowed_global = set(spec.parameters) | set(spec.tensor_parameters)
    native = recipe.merge_method not in METHODS  # a fedmerge aggregator: its own parameters pass through
    unknown = [] if native else sorted(set(recipe.parameters) - allowed_global)
    if unknown:
        raise RecipeParameterError(
            f"{recipe.merge_method} does not take parameter{'s' if len(unknown) > 1 else ''} {unknown}; "
            f"it takes {sorted(allowed_global) or 'none'}"
        )
    for k, v in recipe.parameters.items():
        _check(k, v)
    glob = {k: recipe.parameters.get(k, d) for k, d in spec.parameters.items()}
    if native:
        glob = {k: v for k, v in recipe.parameters.items() if k != "weight"}
    missing = sorted(k for k, v in glob.items() if v is None)
    if missing:
        raise RecipeParameterError(
            f"{recipe.merge_method} needs parameter{'s' if len(missing) > 1 else ''} {missing}"
        )
    per_model: list[dict[str, Any]] = []
    entries = [(m.model.raw, m.parameters) for m in recipe.models] or [
        (s.model.raw, {**sl.parameters, **s.parameters}) for sl in recipe.slices for s in sl.sources
    ]
    for raw, params in entries:
        bad = sorted(set(params) - set(spec.tensor_parameters))
        if bad:
            raise RecipeParameterError(
                f"model {raw!r}: {recipe.merge_method} does not take per-model parameter"
                f"{'s' if len(bad) > 1 else ''} {bad}; "
                f"per model it takes {sorted(spec.tensor_parameters) or 'none'}"
            )
        for k, v in params.items():
            _check(k, v)
        per_model.append(
            {k: params.get(k, recipe.parameters.get(k, d)) for k, d in spec.tensor_parameters.items()}
        )
    for k in spec.per_model_global:
        values = {pm[k] for pm in per_model}
        if len(values) > 1:
            listing = ", ".join(f"{raw}: {pm[k]}" for (raw, _), pm in zip(entries, per_model, strict=True))
            raise RecipeParameterError(
                f"per-model {k} differs ({listing}), but fedmerge's {spec.aggregator} takes one {k} for all "
                f"models; set it once under parameters (mergekit would apply each model's own)"
            )
        glob[k] = values.pop()
    return glob, per_model


def plan_merge(recipe: Recipe, store: Any, *, seed: int = 0) -> Plan:
    """Check the recipe against its models (headers only) and resolve the merge; see the module doc."""
    # values first (t outside [0, 1], negative densities …), whatever the method and its registration
    every_params = [recipe.parameters, *(m.parameters for m in recipe.models)]
    every_params += [p for sl in recipe.slices for p in (sl.parameters, *(x.parameters for x in sl.sources))]
    for params in every_params:
        for k, v in params.items():
            _check(k, v)
    spec = method_spec(recipe.merge_method)
    if recipe.merge_method == "multislerp" and recipe.base_model is not None:
        spec = dataclasses.replace(spec, space="task_vector", needs_base=True)
    glob, per_model = _resolve_params(recipe, spec)
    if spec.needs_base and recipe.base_model is None:
        raise RecipeSchemaError(f"{recipe.merge_method} needs base_model (task vectors are relative to it)")
    agg_params: dict[str, Any] = {}
    if spec.aggregator is not None:
        from fedmerge.aggregators import create

        native = recipe.merge_method not in METHODS  # its own parameters, unchanged
        try:
            translated = dict(glob) if native else mergekit_params(recipe.merge_method, glob)
        except MergekitParameterError as exc:
            raise RecipeParameterError(f"{recipe.merge_method}: {exc}") from None
        agg_params = {**translated, **({"seed": seed} if _takes_seed(spec.aggregator) else {})}
        try:
            create(spec.aggregator, **agg_params)  # the registry checks names and ranges now
        except ConfigError as exc:
            raise RecipeParameterError(
                f"{recipe.merge_method} (mergekit parameters {glob}) maps to aggregator {spec.aggregator!r} "
                f"with {agg_params}, which this fedmerge refuses: {exc}"
            ) from None
    slices = recipe.slices
    sources, every = _open_sources(recipe, store)
    try:
        plan = Plan(recipe, spec, sources, None, [], agg_params, glob, per_model, every=every)
        plan.base = sources[recipe.base_model.raw] if recipe.base_model is not None else None
        plan.notes += list(spec.notes)
        if spec.space == "passthrough":
            _plan_passthrough(plan)
        else:
            models = recipe.models
            if slices:  # slices that each take all layers of every model are the same as `models`
                models = _slices_as_models(recipe)
            inputs = [m for m in models if not (plan.base is not None and m.model.raw == plan.base.ref.raw)]
            lo, hi = spec.models
            if len(inputs) < lo or (hi is not None and len(inputs) > hi):
                want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}–{hi}"
                raise RecipeSchemaError(
                    f"{recipe.merge_method} merges {want} model{'s' if (hi or lo) > 1 else ''} "
                    "besides the base; "
                    f"the recipe gives {len(inputs)}"
                )
            weights = {
                m.model.raw: float(pm.get("weight", 1.0)) for m, pm in zip(models, per_model, strict=True)
            }
            plan.inputs = [(sources[m.model.raw], weights[m.model.raw]) for m in inputs]
            everyone = ([plan.base] if plan.base is not None else []) + [s for s, _ in plan.inputs]
            _check_same(everyone, recipe.merge_method)
            _check_keep_counts(plan)
            if spec.space == "weights" and plan.base is not None and recipe.merge_method == "linear":
                plan.notes.append("linear ignores base_model unless it is listed among models (as mergekit)")
        anchor = plan.base or (plan.inputs[0][0] if plan.inputs else next(iter(plan.out_map.values()))[0])
        plan.anchor = anchor.base if isinstance(anchor, AdapterSource) else anchor
        dtypes = {s.dtype for s in plan.anchor.specs.values() if s.dtype.is_floating_point}
        if recipe.out_dtype and dtypes and {DTYPES[recipe.out_dtype]} != dtypes:
            raise RecipeSchemaError(
                f"out_dtype {recipe.out_dtype} differs from the base's dtype {sorted(map(str, dtypes))}; "
                "the store "
                "keeps the base's dtype — convert the exported model afterwards"
            )
        if recipe.dtype and dtypes and {DTYPES[recipe.dtype]} != dtypes:
            plan.notes.append(
                f"dtype {recipe.dtype} recorded; fedmerge merges in fp32 and keeps the base's dtype"
            )
        if recipe.tokenizer_source not in (None, "base"):
            plan.notes.append(
                f"tokenizer_source {recipe.tokenizer_source!r} recorded; the tokenizer files are the base's"
            )
        return plan
    except BaseException:
        for s in every:
            s.close()
        raise


def _check_keep_counts(plan: Plan) -> None:
    """mergekit's magnitude trim refuses to keep no entry of a tensor (``keep_rounding="mergekit"``):
    refuse such a recipe from the headers rather than in the middle of the merge."""
    from fedmerge.aggregators.sparsify import keep_count

    density = plan.agg_params.get("density")
    if plan.agg_params.get("keep_rounding") != "mergekit" or density is None or density >= 1:
        return
    ref = plan.base or plan.inputs[0][0]
    for name, s in sorted(ref.specs.items()):
        if s.dtype.is_floating_point:
            try:
                keep_count(math.prod(s.shape), density, "mergekit")
            except ConfigError as exc:
                raise RecipeParameterError(f"{plan.recipe.merge_method}, tensor {name!r}: {exc}") from None


def _takes_seed(name: str) -> bool:
    from fedmerge.aggregators import get
    from fedmerge.registry import accepted_params

    return "seed" in accepted_params(get(name))


def _slices_as_models(recipe: Recipe) -> list[InputModel]:
    if len(recipe.slices) != 1:
        raise SliceError(
            f"{recipe.merge_method} with {len(recipe.slices)} slices: fedmerge merges whole models; "
            "slices are "
            "supported for passthrough, or as one slice whose sources all span every layer"
        )
    return [InputModel(s.model, s.parameters) for s in recipe.slices[0].sources]


def _plan_passthrough(plan: Plan) -> None:
    recipe, sources = plan.recipe, plan.sources
    if recipe.models:
        if len(recipe.models) != 1:
            raise RecipeSchemaError(f"passthrough copies one model; the recipe lists {len(recipe.models)}")
        src = sources[recipe.models[0].model.raw]
        scale = plan.per_model[0].get("scale")
        plan.out_map = {n: (src, n, scale) for n in sorted(src.specs)}
        return
    flat = [(i, s) for i, sl in enumerate(recipe.slices) for s in sl.sources]
    for i, sl in enumerate(recipe.slices):
        if len(sl.sources) != 1:
            raise SliceError(
                f"slices[{i}]: passthrough takes exactly one source per slice, got {len(sl.sources)}"
            )
    templates = {}
    for i, s in flat:
        src = sources[s.model.raw]
        prefix, count, tmpl, other = layer_template(src.specs)
        if prefix is None:
            raise SliceError(f"slices[{i}]: model {s.model.raw!r} has no numbered layers to slice")
        a, b = s.layer_range
        if b > count:
            raise SliceError(
                f"slices[{i}]: layer_range [{a}, {b}) goes beyond model {s.model.raw!r}, "
                f"which has {count} layers "
                f"(0–{count - 1})"
            )
        templates[s.model.raw] = (prefix, tmpl, other)
    first = next(iter(templates.values()))
    for raw, t in templates.items():
        if t != first:
            raise SliceError(
                f"passthrough: model {raw!r} has other layer tensors, non-layer tensors or dtypes than "
                f"{flat[0][1].model.raw!r}; slices must come from models of one architecture"
            )
    prefix, tmpl, other = first
    out: dict[str, tuple[Source, str, float | None]] = {}
    j = 0
    for idx, (_, s) in enumerate(flat):
        src = sources[s.model.raw]
        scale = plan.per_model[idx].get("scale")
        for layer in range(*s.layer_range):
            for rest in tmpl:
                out[f"{prefix}.{j}.{rest}"] = (src, f"{prefix}.{layer}.{rest}", scale)
            j += 1
    first_src, last_src = sources[flat[0][1].model.raw], sources[flat[-1][1].model.raw]
    for name in other:
        src = first_src if any(mk in name for mk in PRE_MARKERS) else last_src
        out[name] = (src, name, None)
    plan.out_map = dict(sorted(out.items()))
    plan.out_config = {"num_layers": j}
    plan.notes.append(
        f"passthrough: {j} layers; embeddings from {flat[0][1].model.raw!r}, the other non-layer tensors "
        f"(final norm, head) from {flat[-1][1].model.raw!r}"
    )


# ------------------------------------------------------------------------------------------ merge
def iter_merged(plan: Plan) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield (name, θ, τ) one tensor at a time, sorted by name: θ the merged tensor (fp32 when merged,
    else as stored: non-floating tensors are copied from the base or the first model) and τ = θ − θ_base
    exactly as the aggregator returned it for task-vector methods (else ``None``). One aggregator per
    tensor: memory is the inputs' tensors of that one name plus the aggregator's accumulators."""
    from fedmerge.aggregators import create

    spec = plan.spec
    if spec.space == "passthrough":
        for name, (src, src_name, scale) in plan.out_map.items():
            t = src.get(src_name)
            yield name, (t.float() * scale if scale is not None and t.is_floating_point() else t), None
        return
    assert spec.aggregator is not None
    ref = plan.base or plan.inputs[0][0]
    for name in sorted(ref.specs):
        s = ref.specs[name]
        if not s.dtype.is_floating_point:
            yield name, ref.get(name), None
            continue
        base = plan.base.get(name).float() if plan.base is not None else None
        agg = create(spec.aggregator, **plan.agg_params)
        agg.begin({name: s.shape})
        if spec.space == "weights" and spec.needs_base:  # slerp: the base is the first end point
            assert base is not None
            agg.add({name: base}, 1.0, client_id=0)  # endpoints are ordered by client id: base first
        for i, (src, w) in enumerate(plan.inputs, start=1):
            x = src.get(name).float()
            agg.add(
                {name: x - base if spec.space == "task_vector" and base is not None else x}, w, client_id=i
            )
            del x
        merged = agg.finalize()[name]
        if spec.space == "task_vector" and base is not None:
            yield name, base + merged, merged
        else:
            yield name, merged, None


@dataclass(frozen=True)
class MergeResult:
    """What :func:`run_recipe` committed (and exported)."""

    version: str
    kind: str
    parents: list[str]
    method: str
    aggregator: str | None
    aggregator_params: dict[str, Any]
    tensors: int
    export: str | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "parents": self.parents,
            "method": self.method,
            "aggregator": self.aggregator,
            "aggregator_params": self.aggregator_params,
            "tensors": self.tensors,
            "export": self.export,
            "notes": self.notes,
        }


def _root_for(store: Any, src: Source) -> Any | None:
    """The store's root version whose tensors are bit-identical to ``src``'s, if any (hashes one tensor at
    a time, only for roots with the same names, shapes and dtypes)."""
    from fedmerge.store.blobs import encode_blob
    from fedmerge.store.safetensors_format import dtype_from_name

    for v in store.query(kind="full"):
        specs = {n: Spec(dtype_from_name(e.dtype), tuple(e.shape)) for n, e in v.tensors.items()}
        if specs != src.specs:
            continue
        if all(encode_blob(src.get(n).contiguous())[0] == e.blob for n, e in sorted(v.tensors.items())):
            return v
    return None


def _anchor_version(plan: Plan, store: Any) -> tuple[Any | None, bool]:
    """(version parents[0] will be, whether it must be created from the anchor's directory)."""
    anchor = plan.anchor
    assert anchor is not None
    if isinstance(anchor, StoreSource):
        return anchor.version, False
    found = _root_for(store, anchor)
    return found, found is None


class _Lazy(Mapping[str, torch.Tensor]):
    def __init__(self, src: Source) -> None:
        self.src = src

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.src.specs:
            raise KeyError(name)
        return self.src.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.src.specs))

    def __len__(self) -> int:
        return len(self.src.specs)


def _recipe_record(plan: Plan) -> dict[str, Any]:
    r = plan.recipe
    text = json.dumps(r.raw, sort_keys=True)
    return {
        "recipe": r.raw,
        "recipe_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "recipe_file": Path(r.source).name,
        "sources": {
            raw: {"kind": s.ref.kind, **({"version": s.version.id} if isinstance(s, StoreSource) else {})}
            for raw, s in sorted(plan.sources.items())
        },
        "dtype": r.dtype,
        "out_dtype": r.out_dtype,
        "tokenizer_source": r.tokenizer_source,
        "chat_template": r.chat_template,
        "notes": plan.notes,
    }


def run_recipe(
    recipe: Recipe | str | os.PathLike[str],
    store: Any,
    *,
    export: str | os.PathLike[str] | None = None,
    seed: int = 0,
    aliases: Sequence[str] = ("latest",),
) -> MergeResult:
    """Validate, merge tensor by tensor, commit and (optionally) export; see the module docstring.

    ``store`` is a :class:`~fedmerge.store.ModelStore` or a directory (opened, and created if new).
    """
    from fedmerge.store import ModelStore

    r = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)
    if export is not None:
        out = Path(export)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RecipeError(f"export target {out} exists and is not empty; pick a new directory")
    owned = not isinstance(store, ModelStore)
    s = ModelStore.open(store) if owned else store
    try:
        plan = plan_merge(r, s, seed=seed)
        try:
            return _execute(plan, s, export=export, aliases=aliases)
        finally:
            plan.close()
    finally:
        if owned:
            s.close()


def _execute(plan: Plan, s: Any, *, export: Any, aliases: Sequence[str]) -> MergeResult:
    from fedmerge.store.init import open_base

    anchor = plan.anchor
    assert anchor is not None
    anchor_version, create_root = _anchor_version(plan, s)
    store_inputs = [src.version.id for src in plan.every if isinstance(src, StoreSource)]
    # the output's layout: a delta when it matches the anchor's tensors, else a new root (passthrough)
    out_specs = _output_specs(plan)
    as_delta = out_specs == anchor.specs
    roots = {s.root_of(s.get(v)).id for v in store_inputs}
    if as_delta and anchor_version is not None:
        roots.add(s.root_of(anchor_version).id)
    if as_delta and (len(roots) > 1 or (create_root and roots)):
        raise RecipeModelError(
            f"the inputs descend from different roots of the store ({sorted(roots)}"
            f"{' and the base directory, which is none of them' if create_root else ''}); "
            "a merge combines versions of one base model"
        )
    record = _recipe_record(plan)
    params = {
        "aggregator": plan.spec.aggregator,
        "aggregator_params": plan.agg_params,
        "mergekit_params": plan.mergekit_params,
        "per_model": plan.per_model,
    }
    method = plan.recipe.merge_method
    if not as_delta:
        files = anchor.files()
        if HF_CONFIG in files and plan.out_config:
            cfg = json.loads(files[HF_CONFIG])
            for k in LAYER_COUNT_KEYS:
                if k in cfg:
                    cfg[k] = plan.out_config["num_layers"]
            files[HF_CONFIG] = json.dumps(cfg, indent=2, sort_keys=True).encode()
        merged = {n: t.to(out_specs[n].dtype) for n, t, _ in iter_merged(plan)}
        version = s.commit_base(
            merged,
            name=plan.recipe.raw.get("name") or f"{method}-merge",
            metadata={
                **record,
                "method": method,
                "params": params,
                "derived_from": sorted(set(store_inputs)),
            },
            files=files,
            aliases=aliases,
        )
        parents: list[str] = []
    else:
        if create_root:
            assert anchor.ref.path is not None
            base = open_base(anchor.ref.path)
            with base.checkpoint:
                anchor_version = s.commit_base(
                    _Lazy(anchor), name=base.name, metadata=base.metadata, files=base.files, aliases=()
                )
        assert anchor_version is not None
        parents = [anchor_version.id] + [v for v in dict.fromkeys(store_inputs) if v != anchor_version.id]
        delta: dict[str, torch.Tensor] = {}
        exact = plan.base is anchor  # τ from the aggregator is θ − θ_parent0 exactly
        for name, theta, tau in iter_merged(plan):
            if not theta.is_floating_point():
                continue
            delta[name] = tau if exact and tau is not None else theta.float() - anchor.get(name).float()
        version = s.commit(
            delta,
            parents=parents,
            method=method,
            params=params,
            contributors=[],
            round=None,
            metrics={},
            privacy=None,
            metadata=record,
            aliases=aliases,
        )
    exported = None
    if export is not None:
        s.export(version.id, export)
        exported = str(export)
    return MergeResult(
        version=version.id,
        kind=version.kind,
        parents=parents,
        method=method,
        aggregator=plan.spec.aggregator,
        aggregator_params=plan.agg_params,
        tensors=len(version.tensors),
        export=exported,
        notes=plan.notes,
    )


def _output_specs(plan: Plan) -> dict[str, Spec]:
    if plan.spec.space == "passthrough":
        return {n: src.specs[sn] for n, (src, sn, _) in plan.out_map.items()}
    ref = plan.base or plan.inputs[0][0]
    return dict(ref.specs)
