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

Layout: :mod:`~fedmerge.recipes.schema` (keys, types, model references, errors),
:mod:`~fedmerge.recipes.sources` (models opened lazily), :mod:`~fedmerge.recipes.plan` (method,
parameters, tensor map, checks against the headers), :mod:`~fedmerge.recipes.execute` (streaming merge,
commit, export).
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
