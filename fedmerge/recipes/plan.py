"""Recipe plan: the method's aggregator and parameters, the opened sources, which tensors come from
where (slices) — everything checked before the first tensor is read."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
from fedmerge.recipes.schema import (
    DTYPES,
    InputModel,
    ModelRef,
    Recipe,
    RecipeModelError,
    RecipeParameterError,
    RecipeSchemaError,
    SliceError,
    UnsupportedMethodError,
)
from fedmerge.recipes.sources import (
    PRE_MARKERS,
    AdapterSource,
    HFSource,
    Source,
    StoreSource,
    layer_template,
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


def plan_merge(recipe: Recipe, store: ModelStore, *, seed: int = 0) -> Plan:
    """Check the recipe against its models (headers only) and resolve the merge; see the module doc."""
    # values first (t outside [0, 1], negative densities …), whatever the method and its registration
    every_params = [recipe.parameters, *(m.parameters for m in recipe.models)]
    every_params += [p for sl in recipe.slices for p in (sl.parameters, *(x.parameters for x in sl.sources))]
    for params in every_params:
        for k, v in params.items():
            _check(k, v)
    spec = method_spec(recipe.merge_method)
    if recipe.merge_method in ("multislerp", "nuslerp") and recipe.base_model is not None:
        spec = dataclasses.replace(spec, space="task_vector", needs_base=True)
    glob, per_model = _resolve_params(recipe, spec)
    if spec.needs_base and recipe.base_model is None:
        raise RecipeSchemaError(f"{recipe.merge_method} needs base_model (task vectors are relative to it)")
    agg_params: dict[str, Any] = {}
    if spec.aggregator is not None:
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
