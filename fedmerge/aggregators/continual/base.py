"""Continual mergers: experts arrive one at a time and are folded into one merged task vector.

Life cycle::

    merger = create_continual("opcm", alpha=0.5)
    for tau in experts:                       # task vectors θ_t − θ_0, one at a time
        merged = merger.add_expert(tau)       # what to add to the base now (λ folded in)
    state = merger.state_dict()               # tensors only: persist with safetensors
    again = create_continual("opcm", alpha=0.5)
    again.load_state_dict(state)              # continues bit-identically

Contract shared by every method:

* memory is O(P) (a fixed number of model-sized tensors), whatever the number of experts merged:
  no method keeps a list of past experts;
* task vectors are name → floating tensor (fp32, fp16, bf16, fp64); every computation is in fp32;
  the first expert fixes the names and shapes, later experts must match them exactly;
* ``state_dict()`` holds everything needed to continue exactly, as tensors only (scalars as 0-d
  tensors, the method name as a uint8 tensor) under ``meta/...`` and ``<slot>/<parameter name>``
  keys, so a version store can write it with safetensors next to the merged model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedmerge.delta.rules import NonFiniteMerge, check_values, first_nonfinite, value_bound
from fedmerge.delta.state_dict import check_shapes
from fedmerge.errors import AggregatorStateError, ConfigError, InvalidSubmission
from fedmerge.registry import Registry

STATE_FORMAT = 1
"""Version of the layout of :meth:`ContinualMerger.state_dict`."""

META = "meta/"


def check_finite_number(name: str, value: float, *, low: float | None = None) -> float:
    """A finite float (≥ ``low`` when given), else :class:`ConfigError` naming the parameter."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (low is not None and v < low):
        bound = f" and ≥ {low}" if low is not None else ""
        raise ConfigError(f"{name} must be finite{bound}, got {value!r}")
    return v


def scalar(value: float) -> torch.Tensor:
    """A Python float as a 0-d fp64 tensor (exact round trip)."""
    return torch.tensor(float(value), dtype=torch.float64)


def name_tensor(name: str) -> torch.Tensor:
    """A method name as a 1-d uint8 tensor (safetensors stores tensors only)."""
    return torch.tensor(list(name.encode()), dtype=torch.uint8)


class ContinualMerger(ABC):
    """Base class: validation, fp32 conversion, reference shapes, the state layout and ``num_merged``.

    Subclasses declare ``slots`` (the names of their model-sized fp32 tensors, e.g. ``("merged",)``)
    and ``scalars`` (names of their float state), implement :meth:`_add` and :meth:`_merged`, and keep
    their tensors in ``self._slots[slot][param]`` and floats in ``self._scalars[name]``.
    """

    name: ClassVar[str]
    slots: ClassVar[tuple[str, ...]] = ()
    scalars: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._num_merged = 0
        self._slots: dict[str, dict[str, torch.Tensor]] = {s: {} for s in self.slots}
        self._scalars: dict[str, float] = {s: 0.0 for s in self.scalars}

    # ------------------------------------------------------------------ public interface
    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The exact hyper-parameters (recorded in version manifests)."""

    @property
    def num_merged(self) -> int:
        """How many experts have been folded in."""
        return self._num_merged

    @property
    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Name → shape fixed by the first expert (None before it)."""
        if self._num_merged == 0 or not self.slots:
            return None
        return {k: tuple(v.shape) for k, v in self._slots[self.slots[0]].items()}

    def add_expert(self, task_vector: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold one expert's task vector in; return the merged task vector after it.

        Transactional: an expert that is refused (validation, the magnitude bound
        :func:`~fedmerge.delta.rules.value_bound` of its shapes, or a merge that would not be
        finite) raises :class:`InvalidSubmission` and leaves the state exactly as before.
        """
        tau = self._validated(task_vector)
        snapshot = self.state_dict()
        try:
            self._add(tau)
            self._num_merged += 1
            merged = self.merged()
            bad = first_nonfinite(merged)
            if bad is not None:
                raise NonFiniteMerge(
                    f"{self.name}: merging expert #{self._num_merged} makes tensor {bad!r} NaN or "
                    "infinite; the expert was left out",
                    bad,
                )
        except BaseException:
            self.load_state_dict(snapshot)
            raise
        return merged

    def merged(self) -> dict[str, torch.Tensor]:
        """The current merged task vector (add it to the base as is); fresh fp32 tensors."""
        if self._num_merged == 0:
            raise AggregatorStateError(f"{self.name}: merged() before any add_expert(); nothing merged yet")
        return self._merged()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue exactly, as CPU tensors (copies, contiguous)."""
        out: dict[str, torch.Tensor] = {
            f"{META}method": name_tensor(self.name),
            f"{META}format": torch.tensor(STATE_FORMAT, dtype=torch.int64),
            f"{META}num_merged": torch.tensor(self._num_merged, dtype=torch.int64),
        }
        for s in self.scalars:
            out[f"{META}{s}"] = scalar(self._scalars[s])
        for slot in self.slots:
            for k, v in self._slots[slot].items():
                out[f"{slot}/{k}"] = v.detach().to("cpu", copy=True).contiguous()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`; the keys must match this method exactly."""
        self._check_meta(state)
        n = int(state[f"{META}num_merged"])
        slots: dict[str, dict[str, torch.Tensor]] = {s: {} for s in self.slots}
        for key, value in state.items():
            if key.startswith(META):
                continue
            slot, _, param = key.partition("/")
            if slot not in slots or not param:
                raise AggregatorStateError(
                    f"{self.name}: state key {key!r} is not one of this method's slots {list(self.slots)}; "
                    "was the state written by another method?"
                )
            if value.dtype != torch.float32:
                raise AggregatorStateError(
                    f"{self.name}: state tensor {key!r} is {value.dtype}, expected fp32"
                )
            slots[slot][param] = value.to(self.device, copy=True)
        names = [set(v) for v in slots.values()]
        if n > 0 and (not names or not names[0] or any(x != names[0] for x in names)):
            raise AggregatorStateError(
                f"{self.name}: state with num_merged={n} must hold the same parameter names in every slot "
                f"{list(self.slots)}; the state is incomplete"
            )
        if n == 0 and any(names):
            raise AggregatorStateError(f"{self.name}: state with num_merged=0 must not hold tensors")
        if n > 0:
            ref = {k: tuple(v.shape) for k, v in slots[self.slots[0]].items()} if self.slots else {}
            for slot in self.slots[1:]:
                check_shapes({k: tuple(v.shape) for k, v in slots[slot].items()}, ref, what=f"state {slot}")
        self._slots = slots
        self._scalars = {s: float(state[f"{META}{s}"]) for s in self.scalars}
        self._num_merged = n

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        """Fold one validated fp32 task vector (on ``self.device``) into the state."""

    @abstractmethod
    def _merged(self) -> dict[str, torch.Tensor]:
        """The merged task vector from the current state (new tensors)."""

    # ------------------------------------------------------------------ helpers
    def _validated(self, task_vector: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        expert = f"expert #{self._num_merged + 1}"
        if not task_vector:
            raise InvalidSubmission(f"{self.name}: {expert} is an empty task vector; send every parameter")
        for key in sorted(task_vector):
            t = task_vector[key]
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidSubmission(
                    f"{self.name}: {expert} tensor {key!r} is {kind}; task vectors must be floating tensors "
                    "(leave integer buffers out)"
                )
        ref = self.shapes
        if ref is not None:
            check_shapes(
                {k: tuple(v.shape) for k, v in task_vector.items()}, ref, what=f"{expert} task vector"
            )
        out: dict[str, torch.Tensor] = {}
        for key in sorted(task_vector):
            out[key] = task_vector[key].detach().to(device=self.device, dtype=torch.float32)
        bound = value_bound({k: tuple(v.shape) for k, v in out.items()})
        check_values(out, bound, f"{self.name}: {expert}")  # NaN, ±inf and values beyond the bound
        return out

    def _check_meta(self, state: Mapping[str, torch.Tensor]) -> None:
        required = ["method", "format", "num_merged", *self.scalars]
        for m in required:
            if f"{META}{m}" not in state:
                raise AggregatorStateError(
                    f"{self.name}: state lacks {META}{m}; pass the output of state_dict() unchanged"
                )
        extra = sorted(k for k in state if k.startswith(META) and k[len(META) :] not in required)
        if extra:
            raise AggregatorStateError(f"{self.name}: unexpected state keys {extra}")
        method = bytes(state[f"{META}method"].to(torch.uint8).tolist()).decode(errors="replace")
        if method != self.name:
            raise AggregatorStateError(
                f"state was written by {method!r}, cannot load it into {self.name!r}; "
                f"use create_continual({method!r})"
            )
        fmt = int(state[f"{META}format"])
        if fmt != STATE_FORMAT:
            raise AggregatorStateError(
                f"{self.name}: state format {fmt} is not supported (this is {STATE_FORMAT})"
            )
        if int(state[f"{META}num_merged"]) < 0:
            raise AggregatorStateError(f"{self.name}: num_merged must be ≥ 0")


# ---------------------------------------------------------------------- registry
REGISTRY: Registry[ContinualMerger] = Registry("continual merger")
register_continual = REGISTRY.register  # class decorator: make a continual merger available by its name
available_continual = REGISTRY.names
get_continual = REGISTRY.get
create_continual = REGISTRY.create
