"""Recipe parameter values as mergekit 0.1.5 resolves them, per tensor (``mergekit/config.py``
``evaluate_setting``, ``parameter_resolver.py``).

A setting is a scalar, a *gradient* (a list of scalars) or a list of *conditional* values
(``{filter: SUBSTRING, value: SETTING}``; a single mapping is a list of one). For a tensor ``name`` at
position ``t`` ∈ [0, 1] (the layer's offset in its slice / (slice length − 1), 1 for a one-layer slice,
0 for tensors outside the layers):

* a scalar is itself;
* a gradient of n numbers is interpolated linearly at ``t · (n − 1)``:
  i₀ = ⌊t(n−1)⌋, i₁ = min(n−1, i₀+1), f = t(n−1) − i₀, value = (1−f)·v[i₀] + f·v[i₁]; a gradient
  of booleans or strings takes v[⌊t(n−1)⌋]; an empty list has no value;
* conditionals are tried in order: the first whose ``filter`` is absent, ``"*"`` or a substring of
  ``name`` gives the value (its own value evaluated the same way); none matching: no value.

Scopes are searched from the highest precedence down (a slice source's or model's own parameters, the
slice's, the recipe's); the first scope whose setting yields a value wins, else the method's default.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Conditional:
    """``{filter: ..., value: ...}``: ``value`` applies to tensors whose name contains ``filter``."""

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


Setting = Scalar | tuple[Scalar, ...] | tuple[Conditional, ...]
"""A parameter's value in a recipe: scalar, gradient (tuple of scalars) or conditionals."""


def is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _gradient(values: Sequence[Scalar], t: float) -> Scalar | None:
    if not values:
        return None
    if not all(is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def evaluate(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The value of ``setting`` for one tensor (module docstring); ``None`` when it gives none."""
    if not isinstance(setting, tuple):
        return setting
    if all(not isinstance(e, Conditional) for e in setting):
        return _gradient([e for e in setting if not isinstance(e, Conditional)], t)
    for cond in setting:
        assert isinstance(cond, Conditional)
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate(cond.value, tensor_name, t)
    return None


def resolve(key: str, scopes: Sequence[Mapping[str, Setting]], tensor_name: str, t: float) -> Scalar | None:
    """The first value ``key`` gets in ``scopes`` (highest precedence first), or ``None``."""
    for scope in scopes:
        if key in scope:
            value = evaluate(scope[key], tensor_name, t)
            if value is not None:
                return value
    return None


def leaves(setting: Setting) -> Iterator[Scalar]:
    """Every scalar a setting can take or interpolate between (for range checks: a linear
    interpolation of values in a closed interval stays in it)."""
    if not isinstance(setting, tuple):
        yield setting
        return
    for e in setting:
        if isinstance(e, Conditional):
            yield from leaves(e.value)
        else:
            yield e


def layer_position(offset: int, length: int) -> float:
    """mergekit's ``t`` of the layer at ``offset`` in a slice of ``length`` layers."""
    return offset / (length - 1) if length > 1 else 1.0
