"""State dicts, task vectors and the compatibility checks every merge relies on.

A *state dict* is a mapping from parameter name to tensor. A *task vector* (Ilharco et al. 2023,
"Editing Models with Task Arithmetic") is the element-wise difference τ = θ_ft − θ_base.

Dtype policy: floating tensors (fp64, fp32, fp16, bf16) may differ in dtype between the two sides;
arithmetic is done in fp32 (fp64 stays fp64) and the result of :func:`apply` takes the base's
dtype. Non-floating tensors (integer buffers such as BatchNorm's ``num_batches_tracked``) are not
parameters: task vectors leave them out and :func:`apply` copies them from the base unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeAlias

import torch

from fedmerge.errors import IncompatibleDeltasError

StateDict: TypeAlias = dict[str, torch.Tensor]
"""Parameter name → tensor."""

TaskVector: TypeAlias = dict[str, torch.Tensor]
"""Parameter name → (fine-tuned − base); same names and shapes as the floating part of the base."""

Shapes: TypeAlias = Mapping[str, tuple[int, ...]]


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in ``state`` (the ``reference_shapes`` aggregators begin with)."""
    return {name: tuple(t.shape) for name, t in state.items()}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_shapes(
    shapes: Shapes,
    reference: Shapes,
    *,
    what: str = "delta",
) -> None:
    """Raise :class:`IncompatibleDeltasError` naming the first key that is missing, extra or misshapen."""
    for name, problem in _shape_problems(shapes, reference, what):
        raise IncompatibleDeltasError(problem, key=name)


def _shape_problems(shapes: Shapes, reference: Shapes, what: str) -> Iterator[tuple[str, str]]:
    """(key, what is wrong) for each key of ``reference`` that ``shapes`` lacks or shapes differently,
    in sorted order, then for each key of ``shapes`` that ``reference`` lacks."""
    for name in sorted(reference):
        if name not in shapes:
            yield (
                name,
                (
                    f"{what} is missing tensor {name!r} (expected shape {tuple(reference[name])}); "
                    "send every parameter of the base model, zeros included"
                ),
            )
        elif tuple(shapes[name]) != tuple(reference[name]):
            yield (
                name,
                (
                    f"{what} tensor {name!r} has shape {tuple(shapes[name])}, expected "
                    f"{tuple(reference[name])}: was it computed against a different base model?"
                ),
            )
    for name in sorted(set(shapes) - set(reference)):
        yield (
            name,
            (
                f"{what} has tensor {name!r} that the reference does not have; "
                "remove it or use the matching base model"
            ),
        )


def check_compatible(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    names: tuple[str, str] = ("a", "b"),
) -> None:
    """Check ``a`` and ``b`` have the same names and shapes, and floating dtypes where either is floating.

    Raises :class:`IncompatibleDeltasError` naming the first offending key (in sorted order).
    """
    check_shapes(shapes_of(b), shapes_of(a), what=names[1])
    for name in sorted(a):
        fa, fb = a[name].is_floating_point(), b[name].is_floating_point()
        if fa != fb:
            raise IncompatibleDeltasError(
                f"tensor {name!r} is {a[name].dtype} in {names[0]} but {b[name].dtype} in {names[1]}: "
                "a floating parameter cannot be paired with an integer buffer",
                key=name,
            )


def floating_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Sorted names of the floating-point tensors (the parameters a task vector covers)."""
    return sorted(name for name, t in state.items() if t.is_floating_point())


def task_vector(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> TaskVector:
    """τ = θ_ft − θ_base for every floating tensor, computed in fp32 (fp64 stays fp64)."""
    check_compatible(base, finetuned, names=("base", "finetuned"))
    out: TaskVector = {}
    for name in floating_names(base):
        dtype = accumulation_dtype(base[name].dtype)
        out[name] = finetuned[name].to(dtype) - base[name].to(dtype)
    return out


def apply(
    base: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> StateDict:
    """θ = θ_base + scale · τ, returned in the base's dtypes; non-floating tensors are copied from the base.

    ``delta`` must cover exactly the floating tensors of ``base``.
    """
    floating = {name: tuple(base[name].shape) for name in floating_names(base)}
    check_shapes(shapes_of(delta), floating, what="delta")
    out: StateDict = {}
    for name, tensor in base.items():
        if name not in floating:
            out[name] = tensor.clone()
            continue
        dtype = accumulation_dtype(tensor.dtype)
        merged = tensor.to(dtype) + scale * delta[name].to(device=tensor.device, dtype=dtype)
        out[name] = merged.to(tensor.dtype)
    return out


def add_deltas(deltas: Iterable[Mapping[str, torch.Tensor]]) -> TaskVector:
    """Σ τ_i in fp32 over deltas with identical names and shapes."""
    total: TaskVector = {}
    reference: dict[str, tuple[int, ...]] | None = None
    for delta in deltas:
        if reference is None:
            reference = shapes_of(delta)
            total = {k: v.to(accumulation_dtype(v.dtype)).clone() for k, v in delta.items()}
            continue
        check_shapes(shapes_of(delta), reference)
        for k, v in delta.items():
            total[k] += v.to(total[k].dtype)
    return total


def global_norm(state: Mapping[str, torch.Tensor]) -> float:
    """‖τ‖₂ over all tensors together, computed in fp64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in state.values():
        total += t.detach().to(torch.float64).pow(2).sum().cpu()
    return float(total.sqrt())
