"""mergekit's parameter names and defaults, as named variants of fedmerge's methods.

fedmerge's defaults follow the papers (and peft where it implements them); mergekit's
(arcee-ai/mergekit a6e4028, v0.1.4's merge methods) differ for several methods. ``MERGEKIT_DEFAULTS``
holds, per method name, the fedmerge parameters that reproduce mergekit's defaults, and
:func:`mergekit_params` turns a recipe's method-level ``parameters`` into fedmerge parameters::

    agg = create(name, **mergekit_params(name, {"density": 0.5, "lambda": 0.8, "normalize": False}))

Names: mergekit's ``lambda`` (a Python keyword) is ``scaling``; ``rescale`` (a bool) becomes
``"l1"`` / ``"none"``; a per-model ``weight`` is the ``add(..., weight)`` of that model; ``density``,
``gamma``, ``epsilon``, ``normalize``, ``int8_mask``, ``t``, ``filter_wise`` keep their names.
Per-model ``density``/``gamma``/``epsilon`` (mergekit allows them per model) are not expressible —
one value per merge — and are refused here. Every difference is tabulated in docs/merging.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmerge.errors import ConfigError

_TIES_LIKE = {"vote_weighting": "weighted", "divisor": "weight", "sign_election": "total"}

MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"scaling": 1.0, "normalize": False},
    "linear": {},  # mergekit's linear = fedmerge's fedavg (weighted mean); see docs/merging.md
    "ties": {**_TIES_LIKE, "density": 1.0, "normalize": True, "keep_rounding": "mergekit"},
    "dare_ties": {**_TIES_LIKE, "density": 1.0, "normalize": False, "rescale": "l1", "mask_rng": "torch"},
    "dare_linear": {"density": 1.0, "normalize": False, "rescale": "l1", "mask_rng": "torch"},
    "breadcrumbs": {
        "density": 1.0,
        "gamma": 0.01,
        "normalize": False,
        "rescale": "none",
        "keep_rounding": "mergekit",
    },
    "breadcrumbs_ties": {
        **_TIES_LIKE,
        "density": 1.0,
        "gamma": 0.01,
        "normalize": False,
        "rescale": "none",
        "keep_rounding": "mergekit",
    },
    "della": {
        **_TIES_LIKE,
        "density": 1.0,
        "epsilon": 0.15,
        "normalize": True,
        "rescale": "l1",
        "mask_rng": "torch",
    },
    "della_linear": {
        "density": 1.0,
        "epsilon": 0.15,
        "normalize": False,
        "rescale": "l1",
        "mask_rng": "torch",
    },
    "slerp": {},
    "multislerp": {},
    "model_stock": {"filter_wise": False},
}

RENAMED = {"lambda": "scaling"}
_METHOD_NAMES = {"linear": "fedavg"}


def fedmerge_method(name: str) -> str:
    """The fedmerge aggregator that implements mergekit's method ``name``."""
    if name not in MERGEKIT_DEFAULTS:
        raise ConfigError(
            f"mergekit method {name!r} has no fedmerge equivalent; known: {sorted(MERGEKIT_DEFAULTS)}"
        )
    return _METHOD_NAMES.get(name, name)


def mergekit_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """mergekit's defaults for ``name`` overlaid with a recipe's ``params`` (mergekit spelling)."""
    fedmerge_method(name)
    out = dict(MERGEKIT_DEFAULTS[name])
    for key, value in (params or {}).items():
        if isinstance(value, (list, dict)):
            raise ConfigError(
                f"mergekit parameter {key!r}: per-layer or per-model lists are not supported here"
            )
        target = RENAMED.get(key, key)
        if target == "rescale" and isinstance(value, bool):
            value = "l1" if value else "none"
        out[target] = value
    if name == "linear":  # mergekit's linear normalises by default: fedavg always does
        if out.pop("normalize", True) is not True:
            raise ConfigError("mergekit linear with normalize: false is task_arithmetic; use that method")
        out.pop("scaling", None)
    return out
