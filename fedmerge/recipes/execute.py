"""Recipe execution: the streaming merge (one tensor name at a time, one aggregator per name), the
commit into the store (a delta of the anchor, or a new root for another layout) and the export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmerge.aggregators import create
from fedmerge.aggregators.base import dense_of
from fedmerge.aggregators.gta import breadcrumbs_mask
from fedmerge.aggregators.sparsify import dare_drop, della_drop, trim
from fedmerge.recipes.chat_templates import with_chat_template
from fedmerge.recipes.multi import load_documents, run_documents
from fedmerge.recipes.plan import Plan, TensorJob, plan_merge
from fedmerge.recipes.schema import HF_CONFIG, Recipe, RecipeError, RecipeModelError, parse_recipe
from fedmerge.recipes.sources import LAYER_COUNT_KEYS, Source, Spec, StoreSource
from fedmerge.recipes.vocabulary import TOKENIZER_FILES, DefaultRows, VocabularyRule, default_rows, rebuild
from fedmerge.seeds import derive_generator
from fedmerge.store import ModelStore, Version
from fedmerge.store.blobs import encode_blob
from fedmerge.store.init import open_base
from fedmerge.store.safetensors_format import dtype_from_name


# ------------------------------------------------------------------------------------------ merge
def _presparsify(
    aggregator: str, params: dict[str, Any], x: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """One model's own trim (its density, γ, ε) with the function the aggregator uses, for tensors whose
    per-model values differ; the aggregator then runs with density 1 (which keeps every entry)."""
    d = float(params["density"])
    if aggregator == "ties":
        return dense_of(trim(x, d, params.get("keep_rounding", "floor")))
    if aggregator in ("dare_ties", "dare_linear"):
        return dense_of(dare_drop(x, d, gen, params["rescale"], params["mask_rng"]))
    if aggregator in ("della", "della_linear"):
        return della_drop(x, d, float(params["epsilon"]), gen, params["rescale"], params["mask_rng"])
    if aggregator in ("breadcrumbs", "breadcrumbs_ties"):
        return breadcrumbs_mask(x, d, float(params["gamma"]), params["rescale"], params["keep_rounding"])
    raise AssertionError(f"no per-model sparsification for {aggregator}")  # per_model_global methods only


def _cast(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """A tensor as mergekit loads it: cast to the recipe's ``dtype`` (if any)."""
    return x.to(plan.compute_dtype) if plan.compute_dtype is not None and x.is_floating_point() else x


def _read(plan: Plan, src: Source, name: str, vocab: _Vocabulary | None = None) -> torch.Tensor:
    """A tensor as mergekit reads it: cast to the recipe's ``dtype`` (if any), a vocabulary tensor
    rebuilt for the output vocabulary (:func:`~fedmerge.recipes.vocabulary.rebuild`), then fp32 for the
    maths."""
    x = _cast(plan, src.get(name))
    if vocab is not None:
        x = rebuild(x, vocab[0], src.ref.raw, vocab[1])
    return x.float() if x.is_floating_point() else x


_Vocabulary = tuple[VocabularyRule, DefaultRows]


def _vocabulary(plan: Plan, job: TensorJob) -> _Vocabulary | None:
    """The job's vocabulary rule with its default rows (None: not a vocabulary tensor). Only the models a
    default row needs are read, each once, before the merge reads them again one at a time."""
    if job.vocab is None:
        return None
    entries = {src.ref.raw: (src, n) for src, n in [*job.inputs, *([job.base] if job.base else [])]}
    needed = dict.fromkeys(m for d in job.vocab.defaults for m, _ in d.rows)
    tensors = {}
    for m in needed:
        src, n = entries.get(m) or (plan.sources[m], job.name)
        tensors[m] = _cast(plan, src.get(n))
    src, n = job.inputs[0] if job.inputs else job.base  # type: ignore[misc]
    spec = src.specs[n]
    dtype = plan.compute_dtype if plan.compute_dtype is not None else spec.dtype
    defaults = default_rows(job.vocab, tensors, spec.shape[1:], dtype)
    del tensors
    return job.vocab, defaults


def iter_merged(plan: Plan) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield (name, θ, τ) one tensor at a time, sorted by name: θ the merged tensor (fp32 when merged,
    else as stored: non-floating tensors are copied from the base or the first model) and τ = θ − θ_base
    exactly as the aggregator returned it for task-vector methods (else ``None``). One aggregator per
    tensor, with that tensor's parameters: memory is the inputs' tensors of that one name plus the
    aggregator's accumulators."""
    spec = plan.spec
    for job in plan.jobs:
        first, first_name = job.inputs[0] if job.inputs else job.base or (None, "")
        assert first is not None
        if not first.specs[first_name].dtype.is_floating_point:
            yield job.name, first.get(first_name), None
            continue
        vocab = _vocabulary(plan, job)
        if spec.space == "passthrough":
            x = _read(plan, first, first_name, vocab)
            yield job.name, x * job.scale if job.scale is not None else x, None
            continue
        assert spec.aggregator is not None
        base = _read(plan, *job.base, vocab) if job.base is not None else None
        lowp = plan.compute_dtype if plan.compute_dtype not in (None, torch.float32) else None
        agg = create(spec.aggregator, **job.agg_params)
        shape = first.specs[first_name].shape
        agg.begin({job.name: (job.vocab.padded, *shape[1:]) if job.vocab is not None else shape})
        if spec.space == "weights" and spec.needs_base:  # slerp, nearswap, arcee_fusion: the base first
            assert base is not None
            agg.add({job.name: base}, 1.0, client_id=0)  # endpoints are ordered by client id: base first
        for i, ((src, n), w) in enumerate(zip(job.inputs, job.weights, strict=True), start=1):
            x = _read(plan, src, n, vocab)
            if spec.space == "task_vector" and base is not None:
                # mergekit subtracts in the recipe's dtype: the task vector is rounded to it
                x = (x.to(lowp) - base.to(lowp)).float() if lowp is not None else x - base
            if job.presparsify is not None:
                gen = derive_generator(int(job.agg_params.get("seed", 0)), 0, i, job.name)
                x = _presparsify(spec.aggregator, job.presparsify[i - 1], x, gen)
            agg.add({job.name: x}, w, client_id=i)
            del x
        merged = agg.finalize()[job.name]
        if spec.space == "task_vector" and base is not None:
            yield job.name, base + merged, merged
        else:
            yield job.name, merged, None


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


def _root_for(store: ModelStore, src: Source) -> Version | None:
    """The store's root version whose tensors are bit-identical to ``src``'s, if any (hashes one tensor at
    a time, only for roots with the same names, shapes and dtypes)."""
    for v in store.query(kind="full"):
        specs = {n: Spec(dtype_from_name(e.dtype), tuple(e.shape)) for n, e in v.tensors.items()}
        if specs != src.specs:
            continue
        if all(encode_blob(src.get(n).contiguous())[0] == e.blob for n, e in sorted(v.tensors.items())):
            return v
    return None


def _anchor_version(plan: Plan, store: ModelStore) -> tuple[Version | None, bool]:
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
        "tokenizer": dataclasses.asdict(r.tokenizer) if r.tokenizer is not None else None,
        "chat_template": r.chat_template,
        "notes": plan.notes,
    }


def run_recipe(
    recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any],
    store: ModelStore | str | os.PathLike[str],
    *,
    export: str | os.PathLike[str] | None = None,
    seed: int = 0,
    aliases: Sequence[str] = ("latest",),
) -> MergeResult:
    """Validate, merge tensor by tensor, commit and (optionally) export; see the module docstring.

    ``store`` is a :class:`~fedmerge.store.ModelStore` or a directory (opened, and created if new).
    """
    docs = None if isinstance(recipe, Recipe | Mapping) else load_documents(recipe)
    r = (
        recipe
        if isinstance(recipe, Recipe)
        else parse_recipe(recipe)
        if isinstance(recipe, Mapping) or (docs is not None and len(docs) < 2)
        else None
    )
    if export is not None:
        out = Path(export)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RecipeError(f"export target {out} exists and is not empty; pick a new directory")
    owned = not isinstance(store, ModelStore)
    s = store if isinstance(store, ModelStore) else ModelStore.open(store)

    def run_one(one: Recipe, final: bool) -> MergeResult:
        plan = plan_merge(one, s, seed=seed)
        try:
            return _execute(plan, s, export=export if final else None, aliases=aliases if final else ())
        finally:
            plan.close()

    try:
        if r is not None:
            return run_one(r, True)
        assert docs is not None and not isinstance(recipe, Recipe | Mapping)
        result: MergeResult = run_documents(recipe, docs, run_one)  # mergekit-multi
        return result
    finally:
        if owned:
            s.close()


def _execute(
    plan: Plan, s: ModelStore, *, export: str | os.PathLike[str] | None, aliases: Sequence[str]
) -> MergeResult:
    anchor = plan.anchor
    assert anchor is not None
    anchor_version, create_root = _anchor_version(plan, s)
    store_inputs = [src.version.id for src in plan.every if isinstance(src, StoreSource)]
    # the output's layout: a delta when it matches the anchor's tensors, else a new root (passthrough)
    out_specs = _output_specs(plan)
    # new files (a chat template, a tokenizer with new tokens): a new root
    as_delta = out_specs == anchor.specs and plan.chat_template is None and plan.tokenizer_files is None
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
        "per_tensor": len({repr(sorted(j.agg_params.items())) for j in plan.jobs if j.agg_params}) > 1
        or any(j.presparsify is not None for j in plan.jobs),
    }
    method = plan.recipe.merge_method
    if not as_delta:
        files = anchor.files()
        if HF_CONFIG in files and plan.out_config:
            cfg = json.loads(files[HF_CONFIG])
            for k in LAYER_COUNT_KEYS:
                if k in cfg and "num_layers" in plan.out_config:
                    cfg[k] = plan.out_config["num_layers"]
            if "vocab_size" in plan.out_config:
                cfg["vocab_size"] = plan.out_config["vocab_size"]
            files[HF_CONFIG] = json.dumps(cfg, indent=2, sort_keys=True).encode()
        if HF_CONFIG in files and plan.out_dtype is not None:
            cfg = json.loads(files[HF_CONFIG])
            for k in ("torch_dtype", "dtype"):
                if k in cfg:
                    cfg[k] = str(plan.out_dtype).removeprefix("torch.")
            files[HF_CONFIG] = json.dumps(cfg, indent=2, sort_keys=True).encode()
        if plan.tokenizer_files is not None:  # the output vocabulary's tokenizer replaces the anchor's
            files = {n: b for n, b in files.items() if n not in TOKENIZER_FILES} | plan.tokenizer_files
        if plan.chat_template is not None:
            files = with_chat_template(files, plan.chat_template)
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
    """Each output tensor's dtype and shape: the first input's, floating ones in the output dtype."""
    out = {}
    for job in plan.jobs:
        src, n = job.inputs[0] if job.inputs else job.base  # type: ignore[misc]
        s = src.specs[n]
        if job.vocab is not None:
            s = Spec(s.dtype, (job.vocab.padded, *s.shape[1:]))
        out[job.name] = Spec(plan.out_dtype, s.shape) if plan.out_dtype and s.dtype.is_floating_point else s
    return out
