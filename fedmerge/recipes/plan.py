"""Recipe plan: the method's aggregator and parameters, the opened sources, which tensors come from
where (slices) — everything checked before the first tensor is read."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmerge.aggregators import available, create, get
from fedmerge.aggregators.mergekit import (
    METHODS,
    NOT_IMPLEMENTED,
    MergekitMethod,
    MergekitParameterError,
    check_parameter,
    mergekit_params,
)
from fedmerge.aggregators.sparsify import keep_count
from fedmerge.errors import ConfigError
from fedmerge.recipes.chat_templates import resolve_chat_template
from fedmerge.recipes.parameters import Setting, layer_position, leaves, resolve
from fedmerge.recipes.schema import (
    DTYPES,
    ModelRef,
    Recipe,
    RecipeModelError,
    RecipeParameterError,
    RecipeSchemaError,
    Slice,
    SliceError,
    UnsupportedMethodError,
)
from fedmerge.recipes.sources import (
    LAYER_RE,
    PRE_MARKERS,
    AdapterSource,
    HFSource,
    Source,
    Spec,
    StoreSource,
    layer_template,
)
from fedmerge.recipes.vocabulary import (
    Vocabulary,
    VocabularyRule,
    build_vocabulary,
    config_rows,
    tokenizer_source_of,
    vocabulary_rule,
)
from fedmerge.registry import accepted_params
from fedmerge.store import ModelStore


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
    registered = set(available())
    names = {m for m, s in METHODS.items() if s.aggregator is None or s.aggregator in registered}
    return sorted(names | (registered - set(METHODS)))


def method_spec(name: str) -> MergekitMethod:
    """The :class:`~fedmerge.aggregators.mergekit.MergekitMethod` for a recipe's ``merge_method``; a
    registered aggregator mergekit does not name gets task vectors, per-model ``weight`` and its own
    parameters. :class:`UnsupportedMethodError` if neither."""

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


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and the parameters resolved for it (per-layer
    gradients and filters evaluated at this tensor)."""

    name: str
    inputs: tuple[tuple[Source, str], ...]  # each merged model's (source, tensor name), recipe order
    base: tuple[Source, str] | None  # the base model's tensor (task vectors, slerp-like end points)
    weights: tuple[float, ...]  # each input's weight
    agg_params: dict[str, Any]  # the aggregator's keyword arguments (empty for passthrough)
    # each input's own sparsification (translated parameters) when per-model densities … differ
    presparsify: tuple[dict[str, Any], ...] | None = None
    scale: float | None = None  # passthrough's per-model scale
    vocab: VocabularyRule | None = None  # a vocabulary tensor rebuilt for the tokenizer (vocabulary.py)


@dataclass
class Plan:
    """Everything checked and resolved before the first tensor is read."""

    recipe: Recipe
    spec: MergekitMethod
    sources: dict[str, Source]
    base: Source | None
    jobs: list[TensorJob] = field(default_factory=list)  # sorted by output name
    agg_params: dict[str, Any] = field(default_factory=dict)  # the first merged tensor's (recorded)
    compute_dtype: torch.dtype | None = None  # inputs are cast to it first (mergekit's ``dtype``)
    out_dtype: torch.dtype | None = None  # floating outputs (``out_dtype``, else ``dtype``)
    out_config: dict[str, Any] | None = None
    anchor: Source | None = None  # the source parents[0] materialises to
    notes: list[str] = field(default_factory=list)
    every: list[Source] = field(default_factory=list)  # every opened source (adapters' bases too)
    chat_template: str | None = None  # the output's chat_template.jinja (chat_templates.py)
    tokenizer_files: dict[str, bytes] | None = None  # the output's tokenizer files when they change

    @property
    def inputs(self) -> list[Source]:
        """The merged models (base excluded), recipe order, once each."""
        out: dict[int, Source] = {}
        for job in self.jobs:
            for src, _ in job.inputs:
                out.setdefault(id(src), src)
        return list(out.values())

    def close(self) -> None:
        for s in self.every:
            s.close()


def _open_sources(recipe: Recipe, store: ModelStore) -> tuple[dict[str, Source], list[Source]]:
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


def _check_same(sources: Sequence[Source], what: str, vocab_rows: bool = False) -> None:
    """Same tensors, shapes and dtypes; with ``vocab_rows`` (a tokenizer source) the non-layer tensors
    with config.json's ``vocab_size`` rows may differ in their row count (the vocabulary is rebuilt)."""
    first = sources[0]
    rows = {id(s): config_rows(s.files()) for s in sources} if vocab_rows else {}
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
            if (
                rows
                and a[n].dtype == b[n].dtype
                and a[n].shape[1:] == b[n].shape[1:]
                and len(a[n].shape) >= 2
                and a[n].shape[:1] == (rows[id(first)],)
                and b[n].shape[:1] == (rows[id(other)],)
                and LAYER_RE.match(n) is None
            ):
                continue
            if a[n] != b[n]:
                raise RecipeModelError(
                    f"{what}: tensor {n!r} is {a[n].dtype} {a[n].shape} in {first.ref.raw!r} but "
                    f"{b[n].dtype} {b[n].shape} in {other.ref.raw!r}; "
                    "merge models of one architecture and dtype"
                )


def _check_names(recipe: Recipe, spec: MergekitMethod) -> None:
    """Every parameter name is one the method takes, where it is given; every value in range."""
    allowed_global = set(spec.parameters) | set(spec.tensor_parameters)
    native = recipe.merge_method not in METHODS  # a fedmerge aggregator: its own parameters pass through
    scopes = [("parameters", recipe.parameters)] + [
        (f"slices[{i}].parameters", sl.parameters) for i, sl in enumerate(recipe.slices)
    ]
    for where, params in scopes:
        unknown = [] if native else sorted(set(params) - allowed_global)
        if unknown:
            raise RecipeParameterError(
                f"{recipe.merge_method} does not take parameter{'s' if len(unknown) > 1 else ''} {unknown} "
                f"({where}); it takes {sorted(allowed_global) or 'none'}"
            )
    entries = [(m.model.raw, m.parameters) for m in recipe.models] + [
        (s.model.raw, s.parameters) for sl in recipe.slices for s in sl.sources
    ]
    for raw, params in entries:
        bad = sorted(set(params) - set(spec.tensor_parameters))
        if bad:
            raise RecipeParameterError(
                f"model {raw!r}: {recipe.merge_method} does not take per-model parameter"
                f"{'s' if len(bad) > 1 else ''} {bad}; "
                f"per model it takes {sorted(spec.tensor_parameters) or 'none'}"
            )


@dataclass(frozen=True)
class _Entry:
    """One model of an output slice: its source, first layer, and parameter scopes (highest first)."""

    raw: str
    source: Source
    start: int
    scopes: tuple[Mapping[str, Setting], ...]


@dataclass(frozen=True)
class _Slot:
    """One output tensor before parameters: its name, the slice's entries with their tensor names, t."""

    name: str
    entries: tuple[tuple[_Entry, str], ...]
    shared: tuple[Mapping[str, Setting], ...]
    t: float


def _output_slices(recipe: Recipe, sources: Mapping[str, Source]) -> list[tuple[list[_Entry], Slice | None]]:
    """mergekit's normalisation: ``models`` is one slice over every layer of every model."""
    if recipe.models:
        entries = [
            _Entry(m.model.raw, sources[m.model.raw], 0, (m.parameters, recipe.parameters))
            for m in recipe.models
        ]
        return [(entries, None)]
    out: list[tuple[list[_Entry], Slice | None]] = []
    for sl in recipe.slices:
        entries = [
            _Entry(
                s.model.raw,
                sources[s.model.raw],
                s.layer_range[0],
                (s.parameters, sl.parameters, recipe.parameters),
            )
            for s in sl.sources
        ]
        out.append((entries, sl))
    return list(out)


def _model_slots(recipe: Recipe, entries: list[_Entry]) -> list[_Slot]:
    """A ``models`` recipe: every tensor name of the first model; t from its layer index."""
    ref = entries[0].source
    try:
        prefix, count, _, _ = layer_template(ref.specs)
    except SliceError:  # layers of different tensors: no gradient position, every tensor at t = 0
        prefix, count = None, 0
    slots = []
    for name in sorted(ref.specs):
        m = LAYER_RE.match(name)
        t = layer_position(int(m["idx"]), count) if (m is not None and m["prefix"] == prefix) else 0.0
        slots.append(_Slot(name, tuple((e, name) for e in entries), (recipe.parameters,), t))
    return slots


def _slice_slots(recipe: Recipe, slices: list[tuple[list[_Entry], Slice | None]]) -> tuple[list[_Slot], int]:
    """A ``slices`` recipe: output layer j of slice k takes layer start + offset of each of its sources;
    embeddings from the first slice's sources, the other non-layer tensors from the last slice's."""
    layouts = {}
    for k, (entries, sl) in enumerate(slices):
        lengths = set()
        assert sl is not None
        for e, src in zip(entries, sl.sources, strict=True):
            prefix, count, tmpl, other = layer_template(e.source.specs)
            if prefix is None:
                raise SliceError(f"slices[{k}]: model {e.raw!r} has no numbered layers to slice")
            a, b = src.layer_range
            if b > count:
                raise SliceError(
                    f"slices[{k}]: layer_range [{a}, {b}) goes beyond model {e.raw!r}, "
                    f"which has {count} layers (0–{count - 1})"
                )
            if tokenizer_source_of(recipe) is not None:  # vocabulary rows may differ: rebuilt later
                rows = config_rows(e.source.files())
                other = {
                    n: Spec(sp.dtype, (-1, *sp.shape[1:]))
                    if len(sp.shape) >= 2 and sp.shape[0] == rows
                    else sp
                    for n, sp in other.items()
                }
            layouts[e.raw] = (prefix, tmpl, other)
            lengths.add(b - a)
        if len(lengths) != 1:
            raise SliceError(
                f"slices[{k}]: its sources take {sorted(lengths)} layers; every source of a slice must take "
                "the same number of layers (mergekit's rule)"
            )
    first_raw = next(iter(layouts))
    first = layouts[first_raw]
    for raw, lay in layouts.items():
        if lay != first:
            raise SliceError(
                f"{recipe.merge_method}: model {raw!r} has other layer tensors, non-layer tensors or dtypes "
                f"than {first_raw!r}; slices must come from models of one architecture"
            )
    prefix, tmpl, other = first
    slots: list[_Slot] = []
    j = 0
    for entries, sl in slices:
        assert sl is not None
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        shared = (sl.parameters, recipe.parameters)
        for offset in range(length):
            t = layer_position(offset, length)
            for rest in sorted(tmpl):
                ins = tuple((e, f"{prefix}.{e.start + offset}.{rest}") for e in entries)
                slots.append(_Slot(f"{prefix}.{j}.{rest}", ins, shared, t))
            j += 1
    (first_entries, first_sl), (last_entries, last_sl) = slices[0], slices[-1]
    assert first_sl is not None and last_sl is not None
    for name in sorted(other):
        pre = any(mk in name for mk in PRE_MARKERS)
        entries, sl = (first_entries, first_sl) if pre else (last_entries, last_sl)
        slots.append(_Slot(name, tuple((e, name) for e in entries), (sl.parameters, recipe.parameters), 0.0))
    return sorted(slots, key=lambda s: s.name), j


def _value(key: str, scopes: Sequence[Mapping[str, Setting]], name: str, t: float, default: Any) -> Any:
    v = resolve(key, scopes, name, t)
    if v is None:
        return default
    _check(key, v)
    return v


class _Resolver:
    """Turns a slot into a :class:`TensorJob`: parameters resolved for the tensor, translated to the
    aggregator's, each distinct set checked once by constructing the aggregator."""

    def __init__(self, recipe: Recipe, spec: MergekitMethod, base_raw: str | None, seed: int) -> None:
        self.recipe, self.spec, self.base_raw, self.seed = recipe, spec, base_raw, seed
        self.native = recipe.merge_method not in METHODS
        self.takes_seed = spec.aggregator is not None and "seed" in accepted_params(get(spec.aggregator))
        self.takes_precision = spec.aggregator is not None and "precision" in accepted_params(
            get(spec.aggregator)
        )
        self.checked: set[str] = set()

    def translate(self, glob: dict[str, Any], where: str) -> dict[str, Any]:
        try:
            out = dict(glob) if self.native else mergekit_params(self.recipe.merge_method, glob)
        except MergekitParameterError as exc:
            raise RecipeParameterError(f"{self.recipe.merge_method} ({where}): {exc}") from None
        if self.takes_precision and self.recipe.dtype is not None:  # mergekit computes in the recipe's dtype
            out["precision"] = str(DTYPES[self.recipe.dtype]).removeprefix("torch.")
        return {**out, **({"seed": self.seed} if self.takes_seed else {})}

    def check(self, params: dict[str, Any], glob: dict[str, Any]) -> None:
        key = repr(sorted(params.items()))
        if key in self.checked or self.spec.aggregator is None:
            return
        try:
            create(self.spec.aggregator, **params)  # the registry checks names and ranges now
        except ConfigError as exc:
            raise RecipeParameterError(
                f"{self.recipe.merge_method} (mergekit parameters {glob}) maps to aggregator "
                f"{self.spec.aggregator!r} with {params}, which this fedmerge refuses: {exc}"
            ) from None
        self.checked.add(key)

    def job(self, slot: _Slot) -> TensorJob:
        spec, name, t = self.spec, slot.name, slot.t
        base = next(((e.source, n) for e, n in slot.entries if e.raw == self.base_raw), None)
        inputs = [(e, n) for e, n in slot.entries if e.raw != self.base_raw]
        if self.native:
            keys = {k for sc in slot.shared for k in sc} - {"weight"}
            glob = {k: _value(k, slot.shared, name, t, None) for k in sorted(keys)}
            glob = {k: v for k, v in glob.items() if v is not None}
        else:
            glob = {k: _value(k, slot.shared, name, t, d) for k, d in spec.parameters.items()}
        missing = sorted(k for k, v in glob.items() if v is None)
        if missing:
            raise RecipeParameterError(
                f"{self.recipe.merge_method} needs parameter{'s' if len(missing) > 1 else ''} {missing} "
                f"(no value for tensor {name!r})"
            )
        per_model = [
            {k: _value(k, e.scopes, n, t, d) for k, d in spec.tensor_parameters.items()} for e, n in inputs
        ]
        if spec.space == "passthrough":
            scale = per_model[0].get("scale") if per_model else None
            return TensorJob(name, tuple((e.source, n) for e, n in inputs), None, (1.0,), {}, scale=scale)
        weights = tuple(float(pm.get("weight", 1.0)) for pm in per_model)
        presparsify = None
        differing = [k for k in spec.per_model_global if len({pm[k] for pm in per_model}) > 1]
        for k in spec.per_model_global:
            glob[k] = per_model[0][k] if per_model else spec.tensor_parameters[k]
        if differing:  # each model trimmed with its own values first; the aggregator then keeps all
            presparsify = tuple(
                self.translate({**glob, **{k: pm[k] for k in spec.per_model_global}}, f"tensor {name!r}")
                for pm in per_model
            )
            glob["density"] = 1.0
        params = self.translate(glob, f"tensor {name!r}")
        self.check(params, glob)
        for p in presparsify or ():
            self.check(p, glob)
        job = TensorJob(
            name, tuple((e.source, n) for e, n in inputs), base, weights, params, presparsify=presparsify
        )
        _check_keep_counts(self.recipe, job)
        return job


def _check_keep_counts(recipe: Recipe, job: TensorJob) -> None:
    """mergekit's magnitude trim refuses to keep no entry of a tensor (``keep_rounding="mergekit"``):
    refuse such a recipe from the headers rather than in the middle of the merge."""
    for params in job.presparsify or (job.agg_params,):
        density = params.get("density")
        if params.get("keep_rounding") != "mergekit" or density is None or density >= 1:
            continue
        src, n = job.inputs[0]
        s = src.specs[n]
        if s.dtype.is_floating_point:
            try:
                keep_count(math.prod(s.shape), density, "mergekit")
            except ConfigError as exc:
                raise RecipeParameterError(f"{recipe.merge_method}, tensor {job.name!r}: {exc}") from None


def plan_merge(recipe: Recipe, store: ModelStore, *, seed: int = 0) -> Plan:
    """Check the recipe against its models (headers only) and resolve the merge, tensor by tensor."""
    # values first (t outside [0, 1], negative densities …), whatever the method and its registration
    every_params = [recipe.parameters, *(m.parameters for m in recipe.models)]
    every_params += [p for sl in recipe.slices for p in (sl.parameters, *(x.parameters for x in sl.sources))]
    for params in every_params:
        for k, setting in params.items():
            for v in leaves(setting):
                _check(k, v)
    spec = method_spec(recipe.merge_method)
    if recipe.merge_method in ("multislerp", "nuslerp") and recipe.base_model is not None:
        spec = dataclasses.replace(spec, space="task_vector", needs_base=True)
    _check_names(recipe, spec)
    if spec.needs_base and recipe.base_model is None:
        raise RecipeSchemaError(f"{recipe.merge_method} needs base_model (task vectors are relative to it)")
    sources, every = _open_sources(recipe, store)
    try:
        plan = Plan(recipe, spec, sources, None, every=every)
        plan.base = sources[recipe.base_model.raw] if recipe.base_model is not None else None
        plan.notes += list(spec.notes)
        base_raw = recipe.base_model.raw if recipe.base_model is not None else None
        slices = _output_slices(recipe, sources)
        if spec.space == "passthrough":
            _check_passthrough(recipe, slices)
        elif (
            recipe.models
            and plan.base is not None
            and spec.needs_base
            and all(e.raw != base_raw for e in slices[0][0])
        ):  # mergekit adds the base to the models
            slices[0][0].append(_Entry(base_raw or "", plan.base, 0, ({}, recipe.parameters)))
        if recipe.models:
            everyone = [e.source for e in slices[0][0]]
            if plan.base is not None and plan.base not in everyone:
                everyone.insert(0, plan.base)
            _check_same(everyone, recipe.merge_method, vocab_rows=tokenizer_source_of(recipe) is not None)
            slots = _model_slots(recipe, slices[0][0])
            layers: int | None = None
        else:
            slots, layers = _slice_slots(recipe, slices)
        if spec.space != "passthrough":
            for idx, (entries, _) in enumerate(slices):
                n_inputs = len([e for e in entries if e.raw != base_raw])
                lo, hi = spec.models
                where = "" if recipe.models else f"slices[{idx}]: "
                if n_inputs < lo or (hi is not None and n_inputs > hi):
                    want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}–{hi}"
                    raise RecipeSchemaError(
                        f"{where}{recipe.merge_method} merges {want} model{'s' if (hi or lo) > 1 else ''} "
                        f"besides the base; the recipe gives {n_inputs}"
                    )
                if spec.needs_base and all(e.raw != base_raw for e in entries):
                    raise SliceError(
                        f"slices[{idx}]: {recipe.merge_method} needs the base model {base_raw!r} among the "
                        "slice's sources (its layers are the base of the others')"
                    )
        resolver = _Resolver(recipe, spec, base_raw if spec.space != "passthrough" else None, seed)
        plan.jobs = [
            TensorJob(s.name, ((s.entries[0][0].source, s.entries[0][1]),), None, (1.0,), {})
            if not s.entries[0][0].source.specs[s.entries[0][1]].dtype.is_floating_point
            else resolver.job(s)
            for s in slots
        ]
        plan.agg_params = next((j.agg_params for j in plan.jobs if j.agg_params), {})
        if len({repr(sorted(j.agg_params.items())) for j in plan.jobs if j.agg_params}) > 1:
            plan.notes.append("parameters vary per tensor (gradients or filters); recorded per recipe")
        if layers is not None:
            plan.out_config = {"num_layers": layers}
        if spec.space == "passthrough" and recipe.slices:
            plan.notes.append(
                f"passthrough: {layers} layers; embeddings from {slices[0][0][0].raw!r}, the other non-layer "
                f"tensors (final norm, head) from {slices[-1][0][0].raw!r}"
            )
        if spec.space == "weights" and plan.base is not None and recipe.merge_method == "linear":
            plan.notes.append("linear ignores base_model unless it is listed among models (as mergekit)")
        anchor = plan.base or slots_anchor(plan)
        plan.anchor = anchor.base if isinstance(anchor, AdapterSource) else anchor
        plan.compute_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
        plan.out_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else plan.compute_dtype
        if recipe.merge_method == "arcee_fusion" and not recipe.out_dtype and plan.compute_dtype is not None:
            plan.out_dtype = torch.float32  # mergekit's fp32 mask promotes the result; it writes fp32
            plan.notes.append("arcee_fusion writes float32 without out_dtype (as mergekit)")
        if recipe.chat_template:  # the models' files are read only when a template is asked for
            ordered = {id(src): src for src in [*([plan.base] if plan.base else []), *plan.inputs]}
            plan.chat_template = resolve_chat_template(
                recipe.chat_template, [src.files() for src in ordered.values()]
            )
        if tokenizer_source_of(recipe) is not None:
            merged = [e.source for entries, _ in slices for e in entries]
            vocab = build_vocabulary(recipe, merged, plan.base)
            if vocab is not None:
                order = list(dict.fromkeys(e.raw for entries, _ in slices for e in entries))
                _rebuild_vocabulary(plan, vocab, order)
            plan.notes.append(
                f"tokenizer source {tokenizer_source_of(recipe)!r}: a vocabulary of {len(vocab.ids)} tokens "
                f"(the embedding rows, as mergekit's); the tokenizer files {vocab.source!r}'s"
                + (" with the new tokens added" if vocab.files is not None else "")
                if vocab is not None
                else f"tokenizer source {tokenizer_source_of(recipe)!r}: the models have no tokenizer.json; "
                "tensors unchanged (mergekit would need a tokenizer)"
            )
        return plan
    except BaseException:
        for s in every:
            s.close()
        raise


def slots_anchor(plan: Plan) -> Source:
    """Without a base: the first model of the first merged tensor."""
    return plan.jobs[0].inputs[0][0]


def _check_passthrough(recipe: Recipe, slices: list[tuple[list[_Entry], Slice | None]]) -> None:
    if recipe.models and len(recipe.models) != 1:
        raise RecipeSchemaError(f"passthrough copies one model; the recipe lists {len(recipe.models)}")
    for i, (entries, _) in enumerate(slices):
        if len(entries) != 1:
            raise SliceError(
                f"slices[{i}]: passthrough takes exactly one source per slice, got {len(entries)}"
            )


def _rebuild_vocabulary(plan: Plan, vocab: Vocabulary, order: Sequence[str]) -> None:
    """Attach the vocabulary rule (:mod:`fedmerge.recipes.vocabulary`) to the vocabulary tensors: the
    non-layer tensors with each model's config.json ``vocab_size`` rows."""
    plan.notes.extend(vocab.notes)
    base_raw = plan.base.ref.raw if plan.base is not None else None
    rule, notes = vocabulary_rule(plan.recipe, vocab, order, base_raw)
    plan.notes.extend(notes)
    plan.tokenizer_files = vocab.files
    if rule.identity and all(vocab.model_rows[m] == rule.rows for m in order):
        return
    rules = {tuple(order): rule}
    for k, job in enumerate(plan.jobs):
        src, n = job.inputs[0] if job.inputs else job.base  # type: ignore[misc]
        shape = src.specs[n].shape
        if LAYER_RE.match(job.name) is None and len(shape) >= 2 and shape[0] == vocab.model_rows[src.ref.raw]:
            # M: the models this tensor is merged from (a slice's sources), in the recipe's order
            here = {s.ref.raw for s, _ in [*job.inputs, *([job.base] if job.base else [])]}
            ms = tuple(m for m in order if m in here)
            if ms not in rules:
                rules[ms], more = vocabulary_rule(plan.recipe, vocab, ms, base_raw)
                plan.notes.extend(x for x in more if x not in plan.notes)
            plan.jobs[k] = dataclasses.replace(job, vocab=rules[ms])
    plan.out_config = {**(plan.out_config or {}), "vocab_size": rule.padded}
