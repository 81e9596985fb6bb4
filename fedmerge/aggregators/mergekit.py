"""mergekit's merge methods as fedmerge aggregators: the one table of names, defaults and renames.

fedmerge's defaults follow the papers (and peft where it implements them); mergekit's
(mergekit 0.1.5; arcee-ai/mergekit a6e4028 for the methods 0.1.4 had) differ for several methods.
:data:`METHODS` maps
each mergekit method name to a :class:`MergekitMethod`: the registered aggregator that implements it,
whether it merges task vectors τ_i = θ_i − θ_base or the weights θ_i, mergekit's parameters with
mergekit's defaults, and the fedmerge parameters that reproduce mergekit's behaviour.
:func:`mergekit_params` turns mergekit parameters into the aggregator's keyword arguments::

    agg = create(fedmerge_method(name), **mergekit_params(name, {"density": 0.5, "lambda": 0.8}))

and :data:`MERGEKIT_DEFAULTS` is ``mergekit_params(name)`` for every method (mergekit's defaults as
fedmerge parameters). ``fedmerge merge RECIPE.yaml`` (:mod:`fedmerge.recipes`) takes its methods,
defaults and renames from here.

Names: mergekit's ``lambda`` (a Python keyword) is ``scaling``; ``rescale`` (a bool) becomes
``"l1"`` / ``"none"``; a per-model ``weight`` is the ``add(..., weight)`` of that model; ``density``,
``gamma``, ``epsilon``, ``normalize``, ``int8_mask``, ``t``, ``filter_wise``, ``eps`` keep their
names. Per-model ``density``/``gamma``/``epsilon`` (mergekit allows them per model) are one value per
aggregator here; per-layer gradients (lists) and filters (mappings) are refused here — recipes
(:mod:`fedmerge.recipes`) resolve both per tensor and trim each model with its own values. Every
choice made where
fedmerge's two former tables or fedmerge and mergekit disagree is in docs/merging.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedmerge.errors import ConfigError

Space = Literal["task_vector", "weights", "passthrough"]


class MergekitParameterError(ConfigError):
    """A mergekit parameter is unknown for the method, of the wrong type, out of range, or has a value
    fedmerge cannot reproduce."""


# ------------------------------------------------------------------------------- parameter checks
def _check_range(name: str, low: float, high: float, *, open_high: bool = False) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise MergekitParameterError(f"{name} must be a finite number, got {v!r}")
        if v < low or v > high or (open_high and v >= high):
            bracket = ")" if open_high else "]"
            raise MergekitParameterError(f"{name} must be in [{low}, {high}{bracket}, got {v!r}")

    return check


def _check_finite(name: str) -> Callable[[Any], None]:
    return _check_range(name, -math.inf, math.inf)


def _check_bool(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, bool):
            raise MergekitParameterError(f"{name} must be true or false, got {v!r}")

    return check


def _check_weight(v: Any) -> None:
    _check_finite("weight")(v)
    if v < 0:
        raise MergekitParameterError(
            f"weight must be ≥ 0 (fedmerge's aggregators take non-negative weights), got {v!r}"
        )


PARAMETER_CHECKS: dict[str, Callable[[Any], None]] = {
    "weight": _check_weight,
    "density": _check_range("density", 0.0, 1.0),
    "gamma": _check_range("gamma", 0.0, 1.0),
    "epsilon": _check_range("epsilon", 0.0, 1.0, open_high=True),
    "t": _check_range("t", 0.0, 1.0),
    "lambda": _check_finite("lambda"),
    "scale": _check_finite("scale"),
    "normalize": _check_bool("normalize"),
    "rescale": _check_bool("rescale"),
    "int8_mask": _check_bool("int8_mask"),
    "filter_wise": _check_bool("filter_wise"),
    "normalize_weights": _check_bool("normalize_weights"),
    "max_iter": _check_range("max_iter", 1, 10_000),
    "tol": _check_range("tol", 0.0, 1.0),
    "eps": _check_range("eps", 0.0, 1.0),
    "select_topk": _check_range("select_topk", 0.0, 1.0),
    "r": _check_finite("r"),
    "alpha": _check_finite("alpha"),
    "nuslerp_row_wise": _check_bool("nuslerp_row_wise"),
    "nuslerp_flatten": _check_bool("nuslerp_flatten"),
}
"""Value checks of mergekit's parameters by name (any method); raise :class:`MergekitParameterError`."""


def check_parameter(name: str, value: Any) -> None:
    """Check one parameter value by its mergekit name; names without a check pass."""
    check = PARAMETER_CHECKS.get(name)
    if check is not None:
        check(value)


# ----------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method maps onto a registered fedmerge aggregator.

    ``parameters`` / ``tensor_parameters``: mergekit's method-level and per-model parameters with
    mergekit's defaults (``None``: required). ``fixed``: fedmerge parameters that reproduce mergekit's
    behaviour whatever the recipe says (e.g. ties' weighted vote). ``per_model_global``: per-model
    parameters of mergekit that the aggregator takes once per merge. ``ignored``: mergekit parameters
    that have no effect for this method in mergekit either (accepted, not passed on). ``only``:
    parameters fedmerge reproduces only at this value (mergekit's default); another value is refused.
    ``space``: the aggregator gets task vectors, weights, or (``passthrough``) nothing — tensors are
    copied. ``needs_base``: a ``base_model`` is required; ``models``: (min, max) number of models
    besides the base.
    """

    aggregator: str | None
    space: Space
    parameters: dict[str, Any]
    tensor_parameters: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    per_model_global: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    only: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = False
    models: tuple[int, int | None] = (1, None)
    notes: tuple[str, ...] = ()


RENAMED = {"lambda": "scaling"}
"""mergekit parameter name → fedmerge parameter name, where they differ."""

# mergekit's generalized task arithmetic: every method takes these, with a method-dependent normalize
# and rescale default (merge_methods/registry.py); per model weight (required there) and density.
_GTA = {"int8_mask": False, "lambda": 1.0}
_GTA_MODEL = {"weight": 1.0, "density": 1.0}
# mergekit's sign consensus (get_mask(method="sum")): votes on the weighted deltas, and the disjoint
# mean divides by the agreeing weights (GTATask.execute)
_CONSENSUS = {"sign_election": "total", "vote_weighting": "weighted", "divisor": "weight"}
_LINEAR_ONLY = ("int8_mask",)  # int8_mask is the dtype of the consensus mask: none without consensus
_TORCH_MASKS = {"mask_rng": "torch"}  # mergekit draws its masks with torch.bernoulli


def _gta(
    aggregator: str,
    *,
    normalize: bool,
    rescale: bool,
    consensus: bool,
    model: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
    **rest: Any,
) -> MergekitMethod:
    """A method of mergekit's generalized task arithmetic: task vectors against a required base, the
    shared parameters (:data:`_GTA`, :data:`_GTA_MODEL` and this method's per-model ``model``) with
    this method's ``normalize`` and ``rescale`` defaults. With ``consensus`` (the ``*_ties`` methods,
    della) the sign consensus :data:`_CONSENSUS` is fixed; without it ``int8_mask`` (the consensus
    mask's dtype) is ignored (an ``ignored`` in ``rest`` replaces that)."""
    parameters = {**_GTA, "normalize": normalize, "rescale": rescale}
    rest.setdefault("ignored", () if consensus else _LINEAR_ONLY)
    return MergekitMethod(
        aggregator,
        "task_vector",
        parameters,
        {**_GTA_MODEL, **(model or {})},
        fixed={**(_CONSENSUS if consensus else {}), **(fixed or {})},
        needs_base=True,
        **rest,
    )


# the settings a method with consensus and its linear twin share
_DARE: dict[str, Any] = {"fixed": _TORCH_MASKS, "per_model_global": ("density",)}
_BREADCRUMBS: dict[str, Any] = {
    "model": {"gamma": 0.01},
    "fixed": {"keep_rounding": "floor"},  # magnitude_outliers has no assert: ⌊density·n⌋ = 0 keeps nothing
    "per_model_global": ("density", "gamma"),
}
_DELLA: dict[str, Any] = {
    "model": {"epsilon": 0.15},
    "fixed": _TORCH_MASKS,
    "per_model_global": ("density", "epsilon"),
}
_BASE_FIRST = "the base is added first, the other model second"


def _pair(aggregator: str, parameters: dict[str, Any], note: str = "") -> MergekitMethod:
    """A method of a base and one other model, merged in that order (weights, not task vectors)."""
    return MergekitMethod(
        aggregator, "weights", parameters, {}, needs_base=True, models=(1, 1), notes=(_BASE_FIRST + note,)
    )


METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod(
        "task_arithmetic",
        "weights",
        {"normalize": True},
        {"weight": 1.0},
        fixed={"scaling": 1.0},  # Σ w θ (÷ Σ w with normalize) of the weights themselves
    ),
    "task_arithmetic": _gta(
        "task_arithmetic",
        normalize=False,
        rescale=False,
        consensus=False,
        ignored=("int8_mask", "rescale", "density"),
        notes=("mergekit's task_arithmetic does not sparsify: density and rescale have no effect",),
    ),
    "ties": _gta(
        "ties",
        normalize=True,
        rescale=False,
        consensus=True,
        fixed={"keep_rounding": "mergekit"},  # sparsify.magnitude asserts k > 0
        per_model_global=("density",),
        only={"rescale": False},  # fedmerge's ties has no L1 rescale after the trim
    ),
    "dare_ties": _gta("dare_ties", normalize=False, rescale=True, consensus=True, **_DARE),
    "dare_linear": _gta("dare_linear", normalize=False, rescale=True, consensus=False, **_DARE),
    "breadcrumbs": _gta("breadcrumbs", normalize=False, rescale=False, consensus=False, **_BREADCRUMBS),
    "breadcrumbs_ties": _gta(
        "breadcrumbs_ties", normalize=False, rescale=False, consensus=True, **_BREADCRUMBS
    ),
    "della": _gta("della", normalize=True, rescale=True, consensus=True, **_DELLA),
    "della_linear": _gta("della_linear", normalize=False, rescale=True, consensus=False, **_DELLA),
    "slerp": _pair("slerp", {"t": None}, ": t = 0 is the base, t = 1 the other"),
    "model_stock": MergekitMethod(
        "model_stock",
        "task_vector",
        {"filter_wise": False},
        {},
        needs_base=True,
        models=(2, None),
    ),
    "karcher": MergekitMethod(
        "karcher",
        "weights",
        {"max_iter": 10, "tol": 1e-5},
        {"weight": 1.0},
        notes=("mergekit ignores a per-model weight (equal weights); fedmerge weights the mean",),
    ),
    "multislerp": MergekitMethod(
        "multislerp",
        "weights",
        {"normalize_weights": True, "eps": 1e-8},
        {"weight": 1.0},
        only={"normalize_weights": True},  # fedmerge's multislerp always normalises the weights
        notes=("with base_model, multislerp interpolates task vectors and adds the base back (as mergekit)",),
    ),
    "passthrough": MergekitMethod(None, "passthrough", {}, {"scale": None}, models=(1, 1)),
    "nuslerp": MergekitMethod(
        "nuslerp",
        "weights",
        {"nuslerp_row_wise": False, "nuslerp_flatten": True},
        {"weight": 1.0},
        models=(2, 2),
        notes=("with base_model, nuslerp interpolates task vectors and adds the base back (as mergekit)",),
    ),
    "nearswap": _pair("nearswap", {"t": None}),
    "arcee_fusion": _pair("arcee_fusion", {}),
    "sce": MergekitMethod(
        "sce", "task_vector", {"int8_mask": False, "select_topk": 1.0}, {}, needs_base=True
    ),
    "ram": MergekitMethod("ram", "task_vector", {"epsilon": 1e-5}, {}, needs_base=True),
    "ramplus_tl": MergekitMethod(
        "ramplus_tl", "task_vector", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, needs_base=True
    ),
}
"""mergekit method name → :class:`MergekitMethod` (mergekit a6e4028's ``merge_methods/registry.py``)."""

NOT_IMPLEMENTED: set[str] = set()
"""mergekit methods without a fedmerge counterpart (refused by name): none of mergekit 0.1.5's."""


def method(name: str) -> MergekitMethod:
    """The :class:`MergekitMethod` of mergekit's method ``name``; :class:`ConfigError` if there is none."""
    spec = METHODS.get(name)
    if spec is None:
        why = "is not implemented by fedmerge" if name in NOT_IMPLEMENTED else "has no fedmerge equivalent"
        raise ConfigError(f"mergekit method {name!r} {why}; known: {sorted(METHODS)}")
    return spec


def fedmerge_method(name: str) -> str:
    """The fedmerge aggregator that implements mergekit's method ``name`` (``passthrough`` has none)."""
    agg = method(name).aggregator
    if agg is None:
        raise ConfigError(f"mergekit's {name!r} copies tensors; no aggregator implements it")
    return agg


def mergekit_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """mergekit's defaults for ``name`` overlaid with ``params`` (mergekit's names: method-level
    parameters, and per-model ones the aggregator takes once per merge, e.g. ``density``), as the
    keyword arguments of :func:`fedmerge_method` ``(name)``'s aggregator.

    Raises :class:`MergekitParameterError` for unknown parameters, bad values, missing required ones
    (slerp's ``t``) and values fedmerge cannot reproduce.
    """
    return _translate(name, method(name), params or {}, require=True)


def _translate(
    name: str, spec: MergekitMethod, params: Mapping[str, Any], *, require: bool
) -> dict[str, Any]:
    allowed = {**spec.parameters, **{k: spec.tensor_parameters[k] for k in spec.per_model_global}}
    allowed.update({k: spec.tensor_parameters[k] for k in spec.ignored if k in spec.tensor_parameters})
    for key, value in params.items():
        if key not in allowed:
            raise MergekitParameterError(
                f"mergekit's {name} does not take parameter {key!r} once per merge; "
                f"it takes {sorted(allowed) or 'none'}"
            )
        if isinstance(value, list | dict):
            raise MergekitParameterError(
                f"mergekit parameter {key!r}: per-layer or per-model lists are not supported here"
            )
        check_parameter(key, value)
    values = {**allowed, **params}
    missing = sorted(k for k, v in values.items() if v is None)
    if missing and require:
        raise MergekitParameterError(
            f"mergekit's {name} needs parameter{'s' if len(missing) > 1 else ''} {missing}"
        )
    out = dict(spec.fixed)
    for key, value in values.items():
        if key in spec.ignored or value is None:
            continue
        if key in spec.only:
            if value != spec.only[key]:
                raise MergekitParameterError(
                    f"mergekit's {name} with {key}: {value!r} is not reproduced by fedmerge's "
                    f"{spec.aggregator}; only {key}: {spec.only[key]!r} (mergekit's default) is"
                )
            continue
        if key == "rescale":
            value = "l1" if value else "none"  # mergekit: L1 norm restored after the drop
        out[RENAMED.get(key, key)] = value
    return out


MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    n: _translate(n, s, {}, require=False) for n, s in METHODS.items() if s.aggregator is not None
}
"""mergekit's defaults as fedmerge parameters, per mergekit method (required parameters left out)."""
