"""mergekit YAML recipes: ``fedmerge merge RECIPE.yaml --store DIR [--export DIR]``.

A recipe is mergekit 0.1.5's ``MergeConfiguration``::

    merge_method: ties                     # mergekit's name (aggregators.mergekit.METHODS) or any aggregator
    base_model: store:v000001              # task-vector methods: τ_i = θ_i − θ_base
    models:
      - model: ./experts/math              # a Hugging Face model directory (safetensors)
        parameters: {weight: 1.0, density: [1, 0.7, 0.1]}          # a per-layer gradient
      - model: store:prod                  # a store version by id or alias
        parameters: {weight: [{filter: mlp, value: 0.5}, {value: 0}], density: 0.5}   # conditional
      - model: ./base+./adapters/code      # mergekit's BASE+ADAPTER: a peft LoRA adapter merged into BASE
    parameters: {lambda: 1.0, normalize: true}
    dtype: float16                         # inputs and task vectors rounded to it; the output's dtype
    out_dtype: bfloat16                    # optional: the output's dtype

or ``slices`` (each a list of ``sources`` with ``layer_range``s of equal length, for any method; one
source per slice for ``passthrough`` "frankenmerges").

**Model references.** ``store:ID`` or ``store:ALIAS`` names a version of the ``--store`` (its
materialised weights); ``A+B`` is the base ``A`` with the peft LoRA adapter ``B`` merged into it; a bare
adapter directory is merged into ``base_model``; anything else is a Hugging Face model directory.
Paths are relative to the recipe's directory.

**Parameters** are resolved per output tensor as mergekit does (:mod:`fedmerge.recipes.parameters`):
gradients interpolated over the layers of each slice, ``filter`` conditions on the tensor name,
precedence model > slice > recipe, each model's own ``weight``/``density``/``gamma``/``epsilon``.

**Methods** come from :data:`fedmerge.aggregators.mergekit.METHODS` and
:func:`~fedmerge.aggregators.mergekit.mergekit_params` (docs/merging.md lists them).

**Streaming.** Every source is opened lazily; the merge runs one output tensor at a time with one
aggregator per tensor, so memory is the N input tensors of one name plus the merged model.

**Validation before any tensor is read** (one :class:`RecipeError` subclass, nothing committed), and
**the result**: a delta of the base, or a new root when the layout or dtype differs from the base's
(docs/merging.md, *Recipes*, also lists every difference from mergekit 0.1.5).

Layout: :mod:`~fedmerge.recipes.schema` (keys, types, model references, errors),
:mod:`~fedmerge.recipes.parameters` (gradients, filters), :mod:`~fedmerge.recipes.sources` (models
opened lazily), :mod:`~fedmerge.recipes.plan` (one job per output tensor, checked against the headers),
:mod:`~fedmerge.recipes.execute` (streaming merge, commit, export).
"""

from fedmerge.aggregators.mergekit import METHODS
from fedmerge.recipes.execute import MergeResult, iter_merged, run_recipe
from fedmerge.recipes.plan import Plan, available_methods, method_spec, plan_merge
from fedmerge.recipes.schema import (
    DTYPES,
    InputModel,
    ModelRef,
    Recipe,
    RecipeError,
    RecipeModelError,
    RecipeParameterError,
    RecipeSchemaError,
    Slice,
    SliceError,
    SliceSource,
    UnsupportedMethodError,
    parse_model_ref,
    parse_recipe,
)
from fedmerge.recipes.sources import AdapterSource, HFSource, Source, Spec, StoreSource, layer_template

__all__ = [
    "DTYPES",
    "METHODS",
    "AdapterSource",
    "HFSource",
    "InputModel",
    "MergeResult",
    "ModelRef",
    "Plan",
    "Recipe",
    "RecipeError",
    "RecipeModelError",
    "RecipeParameterError",
    "RecipeSchemaError",
    "Slice",
    "SliceError",
    "SliceSource",
    "Source",
    "Spec",
    "StoreSource",
    "UnsupportedMethodError",
    "available_methods",
    "iter_merged",
    "layer_template",
    "method_spec",
    "parse_model_ref",
    "parse_recipe",
    "plan_merge",
    "run_recipe",
]
