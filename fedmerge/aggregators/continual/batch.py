"""Continual mergers that are a streaming batch aggregator folded one expert at a time, plus state.

Where a continual method is exactly a batch method applied to the experts seen so far, the batch
aggregator does the arithmetic and this adaptor only keeps the stream open between arrivals::

    τ⁽ᵗ⁾ = A(τ_1, …, τ_t)      A = the batch aggregator, every expert with weight 1, client ids 0..t−1

Each :meth:`~ContinualMerger.add_expert` is one :meth:`~fedmerge.aggregators.base.Aggregator.add`
(group size 1: folded at once), and the merged vector is
:meth:`~fedmerge.aggregators.base.Aggregator.current` (finalise without ending the stream). The
persisted state is the aggregator's accumulators (one slot each, reshaped to the parameter shapes)
and ``meta/num_merged``; the aggregator's client count and total weight are both ``num_merged``
(unit weights), so nothing else is stored, and the layout is format 1 unchanged.

A method is offered this way by declaring ``continual_defaults`` on its aggregator class (the
continual parameters and their defaults, in one place); the registrations below name the continual
merger and its slots (the persisted layout, which must not change: stored tracks resume from it).

Registered here (the proof that each is the batch merge is ``tests/continual/test_batch_adaptor.py``):

* ``continual_task_arithmetic`` = :class:`~fedmerge.aggregators.task_arithmetic.TaskArithmetic`,
  τ⁽ᵗ⁾ = λ Σ_{i≤t} τ_i (Ilharco et al. 2023; the baseline of Tang et al. 2025), slot ``sum``;
* ``magmax`` = :class:`~fedmerge.aggregators.magmax.MagMax`, τ⁽ᵗ⁾ = λ · (per coordinate, the value
  of largest magnitude so far) (Marczak et al. 2024), slot ``maxabs``.

Not here, because they are not a batch merge of the experts: ``continual_ties`` (TIES of the merged
vector so far with the new expert, fed back), ``opcm`` (projection and rescaling), and
``running_average``, whose state is the running mean updated by FusionBench's recursion
((t − 1) τ⁽ᵗ⁻¹⁾ + τ_t) / t; FedAvg with unit weights is the same mean but rounds differently
(Σ τ_i · (1/t)), and stored tracks hold the mean, not the sum.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.base import Aggregator
from fedmerge.aggregators.continual.base import ContinualMerger, check_finite_number, register_continual
from fedmerge.aggregators.magmax import MagMax
from fedmerge.aggregators.task_arithmetic import TaskArithmetic
from fedmerge.errors import ConfigError


class BatchContinual(ContinualMerger):
    """A streaming :class:`Aggregator` (``aggregator``) as a continual merger (module docstring).

    Subclasses set ``name``, ``aggregator`` and ``slots`` (one name per accumulator of the
    aggregator, in its order). Their constructor takes exactly the keys of
    ``aggregator.continual_defaults`` (with those defaults) and ``device``; numeric parameters must
    be finite. ``params`` is those keys with the values used.
    """

    aggregator: ClassVar[type[Aggregator]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.aggregator.continual_defaults
        if not declared or not cls.aggregator.streaming or not cls.slots:
            raise TypeError(
                f"{cls.__name__}: needs a streaming aggregator that declares continual_defaults, and "
                "one slot per accumulator"
            )

        def init(self: BatchContinual, *, device: str | torch.device = "cpu", **params: Any) -> None:
            BatchContinual.__init__(self, device=device, **params)

        # The signature the registry checks parameters against: the declared continual parameters.
        kw = inspect.Parameter.KEYWORD_ONLY
        signature = inspect.Signature(
            [
                inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                *(inspect.Parameter(k, kw, default=v) for k, v in declared.items()),
                inspect.Parameter("device", kw, default="cpu"),
            ]
        )
        setattr(init, "__signature__", signature)  # noqa: B010
        init.__name__, init.__qualname__ = "__init__", f"{cls.__qualname__}.__init__"
        cls.__init__ = init  # type: ignore[method-assign]

    def __init__(self, *, device: str | torch.device = "cpu", **params: Any) -> None:
        super().__init__(device=device)
        declared = self.aggregator.continual_defaults
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ConfigError(f"{self.name} does not take {unknown}; it accepts {sorted(declared)}")
        values = {**declared, **params}
        for k, default in declared.items():
            if isinstance(default, float):
                values[k] = check_finite_number(k, values[k])
        self._values = values
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._agg = self._new_aggregator()
        self._params = {k: self._agg.params[k] for k in declared}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def batch(self) -> Aggregator:
        """The batch aggregator doing the arithmetic (its stream stays open between experts)."""
        return self._agg

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self._agg = self._new_aggregator()
        self._shapes = {}
        if self._num_merged == 0:
            return
        self._shapes = {k: tuple(v.shape) for k, v in self._slots[self.slots[0]].items()}
        accumulators = {
            k: [self._slots[s][k].reshape(-1).contiguous() for s in self.slots] for k in self._shapes
        }
        n = self._num_merged
        self._agg.resume(self._shapes, accumulators, num_clients=n, total_weight=float(n))
        self._link_slots()

    # ------------------------------------------------------------------ hooks
    def _add(self, tau: dict[str, torch.Tensor]) -> None:
        if self._num_merged == 0:
            self._shapes = {k: tuple(v.shape) for k, v in tau.items()}
            self._agg.begin(self._shapes)
        self._agg.add(tau, 1.0, client_id=self._num_merged)
        self._link_slots()

    def _merged(self) -> dict[str, torch.Tensor]:
        return self._agg.current()

    # ------------------------------------------------------------------ helpers
    def _new_aggregator(self) -> Aggregator:
        return self.aggregator(**self._values, group_size=1, device=self.device)

    def _link_slots(self) -> None:
        """Point each slot at the aggregator's live accumulators, viewed with the parameter shapes."""
        accumulators = self._agg.accumulator_state()
        if any(len(a) != len(self.slots) for a in accumulators.values()):
            raise TypeError(f"{self.name}: {self.aggregator.__name__} has not {len(self.slots)} accumulators")
        self._slots = {
            slot: {k: accumulators[k][i].view(self._shapes[k]) for k in sorted(accumulators)}
            for i, slot in enumerate(self.slots)
        }


@register_continual
class ContinualTaskArithmetic(BatchContinual):
    """τ⁽ᵗ⁾ = λ · Σ_{i≤t} τ_i (λ = ``scaling``, default 0.3): batch task arithmetic plus its running sum.

    Ilharco et al. 2023, "Editing Models with Task Arithmetic"; the continual baseline of Tang et al.
    2025 (FusionBench ``ContinualTaskArithmeticForCLIP``). The merged update's norm grows with t
    (≈ √t for orthogonal experts, t for aligned ones), so the model drifts from the base as experts
    accumulate. State: Σ τ_i (slot ``sum``), O(P).
    """

    name: ClassVar[str] = "continual_task_arithmetic"
    aggregator: ClassVar[type[Aggregator]] = TaskArithmetic
    slots: ClassVar[tuple[str, ...]] = ("sum",)


@register_continual
class SequentialMagMax(BatchContinual):
    """τ⁽ᵗ⁾ = λ · m⁽ᵗ⁾, m⁽ᵗ⁾_j = τ_{i*, j}, i* = argmax_{i≤t} |τ_{i, j}| (λ = ``scaling``, default 0.5).

    Marczak et al. 2024, "MagMax"; batch MagMax plus its max-magnitude accumulator (slot ``maxabs``),
    O(P). Equal to the batch result in any arrival order (ties in magnitude go to the positive
    value). The two defaults, and why they differ, are on :class:`~fedmerge.aggregators.magmax.MagMax`.
    """

    name: ClassVar[str] = "magmax"
    aggregator: ClassVar[type[Aggregator]] = MagMax
    slots: ClassVar[tuple[str, ...]] = ("maxabs",)
