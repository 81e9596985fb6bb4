"""The streaming aggregator interface and the registry.

Life cycle of one merge::

    agg = create("ties", density=0.2, seed=7, round=3)
    agg.begin(reference_shapes)          # name → shape of every tensor of the delta
    for delta, n in replies:             # as replies arrive
        agg.add(delta, weight=n, client_id=cid)
    merged = agg.finalize()              # name → fp32 tensor

``add`` accepts, per tensor, a dense tensor (fp32, fp16, bf16, fp64) or a
:class:`~fedmerge.delta.SparseTensor`; everything is accumulated in fp32. Dense deltas are held
in a group of at most ``group_size`` clients and folded together (see
:mod:`fedmerge.aggregators.kernels`), so memory is O(P + group_size·P) whatever the number of
clients. Sparse deltas are folded at once, except by methods with ``groups_sparse`` (the sign
consensus family), which hold them in a group of at most ``group_size`` clients too and fold the
group per block of coordinates: memory O(P + group_size·nnz); ``group_size=1`` folds every client
at once. Aggregators whose ``streaming`` flag is False (the
coordinate-wise median and trimmed mean) must buffer every delta: O(N·P).

Randomness: every stochastic step draws from a ``torch.Generator`` derived from
(seed, round, client id, tensor name) by :func:`derive_generator`, so results do not depend on
arrival order or on which tensors are processed first; ``add(..., generator=g)`` overrides it
with one generator consumed over the tensors in sorted-name order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypedDict

import torch

from fedmerge.aggregators.kernels import zeros
from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import check_shapes
from fedmerge.errors import AggregatorStateError, ConfigError, InvalidSubmission
from fedmerge.registry import Registry
from fedmerge.seeds import derive_generator


class AddOptions(TypedDict, total=False):
    """The keyword options of :meth:`Aggregator.add`, for a method whose ``add`` takes more."""

    client_id: str | int | None
    generator: torch.Generator | None


DeltaTensor: TypeAlias = torch.Tensor | SparseTensor
ClientDelta: TypeAlias = Mapping[str, DeltaTensor]


@dataclass
class Prepared:
    """A client tensor after the aggregator's per-client step (trim, drop, ...).

    A fused TIES trim: the fold keeps entry j iff |x_j| > threshold, or |x_j| == threshold and
    j < tie_cut (see :func:`fedmerge.aggregators.kernels.topk_threshold`). The defaults keep all.
    """

    data: DeltaTensor
    threshold: float = 0.0
    tie_cut: int = 2**62


def check_fraction(
    name: str, value: float, *, low: float = 0.0, high: float = 1.0, open_low: bool = False
) -> float:
    """Validate a hyper-parameter in [low, high] (or (low, high] with ``open_low``)."""
    v = float(value)
    ok = (v > low if open_low else v >= low) and v <= high and math.isfinite(v)
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return v


class Aggregator(ABC):
    """Base class: the begin/add/finalize state machine, validation, grouping and randomness."""

    name: ClassVar[str]
    streaming: ClassVar[bool] = True  # memory independent of the number of clients
    averaging: ClassVar[bool] = False  # identical client deltas (any weights) merge to that delta
    stochastic: ClassVar[bool] = False
    identity_params: ClassVar[dict[str, Any]] = {}  # parameters under which `averaging` holds
    # Parameters a federated round uses unless its run config sets them (clients' weights are their
    # numbers of examples; clients may have trimmed already). Batch merging uses the method's defaults.
    round_defaults: ClassVar[dict[str, Any]] = {}
    # The parameters this method takes as a *continual* merger, with their defaults there (experts
    # folded one at a time with unit weights and the accumulators persisted between arrivals:
    # fedmerge.aggregators.continual.batch). The keys are the continual merger's ``params``; any other
    # parameter keeps its constructor default. Empty: the method is not offered as a continual merger.
    continual_defaults: ClassVar[dict[str, Any]] = {}
    # Per-client inputs beside the delta that ``add`` needs (e.g. a diagonal Fisher); federated rounds
    # and the intake carry deltas only, so they refuse a method that names any.
    side_inputs: ClassVar[tuple[str, ...]] = ()
    # The merge of each tensor depends only on the clients' values of that tensor (and their weights):
    # merging tensor by tensor, each with a fresh instance, gives the whole merge exactly. Federated
    # rounds then fold spooled deltas tensor-major (fedmerge.flower.server.spool_merge). False for methods
    # that look at whole deltas at once (distances or norms over every tensor: Krum, norm bounding).
    tensorwise: ClassVar[bool] = True
    # The attributes this class adds to ``params``, each recorded under its own name.
    param_attrs: ClassVar[tuple[str, ...]] = ()
    # Sparse client tensors are held in groups of ``group_size`` clients and folded by
    # ``_fold_sparse_group`` (like dense ones) instead of one by one at ``add``. Pending sparse groups
    # are always folded before pending dense groups, so every accumulator receives the clients'
    # contributions in the same order as with immediate sparse folds.
    groups_sparse: ClassVar[bool] = False

    def __init__(
        self,
        *,
        seed: int = 0,
        round: int = 0,
        group_size: int = 8,
        device: str | torch.device = "cpu",
    ) -> None:
        if int(group_size) < 1:
            raise ConfigError(f"group_size must be ≥ 1, got {group_size!r}")
        self.seed = int(seed)
        self.round = int(round)
        self.group_size = int(group_size)
        self.device = torch.device(device)
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._pending: list[tuple[dict[str, Prepared], float]] = []
        self._pending_sparse: list[tuple[dict[str, Prepared], float]] = []
        self._acc: dict[str, list[torch.Tensor]] = {}
        self._num_clients = 0
        self._total_weight = 0.0
        self._finalized = False

    # ------------------------------------------------------------------ public interface
    @property
    def params(self) -> dict[str, Any]:
        """The method's hyper-parameters, exactly as used (recorded in version manifests): the seed and
        the round, then the attributes each class names in its ``param_attrs`` (base classes first);
        a class whose parameters are not plain attributes extends this property."""
        out: dict[str, Any] = {"seed": self.seed, "round": self.round}
        for cls in reversed(type(self).__mro__):
            out.update((name, getattr(self, name)) for name in vars(cls).get("param_attrs", ()))
        return out

    @property
    def dp_calibrated(self) -> bool:
        """True when the output is the unit-weight mean Σ τ̄_i / n of the (clipped) deltas, so Gaussian
        noise of std z·C/n on it is calibrated for user-level DP (docs/privacy.md §4). False for every
        method with sign election, selection or medians (unbounded sensitivity)."""
        return False

    @property
    def num_clients(self) -> int:
        return self._num_clients

    def begin(self, reference_shapes: Mapping[str, Sequence[int]]) -> None:
        """Start a merge over tensors with these names and shapes."""
        if self._shapes is not None and not self._finalized:
            raise AggregatorStateError(f"{self.name}: begin() called twice; call finalize() first")
        if not reference_shapes:
            raise ConfigError(f"{self.name}: reference_shapes is empty; nothing to merge")
        self._shapes = {k: tuple(int(d) for d in v) for k, v in reference_shapes.items()}
        self._pending, self._pending_sparse, self._acc = [], [], {}
        self._num_clients, self._total_weight, self._finalized = 0, 0.0, False

    def add(
        self,
        client_delta: ClientDelta,
        weight: float = 1.0,
        *,
        client_id: str | int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Fold one client's delta in. ``weight`` is e.g. its number of examples (≥ 0, finite).

        Methods refine this through two hooks rather than overriding it: :meth:`_admit` (before any
        check: refuse the client, or transform its delta) and :meth:`_accepted` (after it was folded)."""
        shapes = self._require_begun()
        cid = self._num_clients if client_id is None else client_id
        client_delta = self._admit(cid, client_delta)
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise InvalidSubmission(f"client {cid}: weight must be finite and ≥ 0, got {weight!r}")
        check_shapes({k: tuple(v.shape) for k, v in client_delta.items()}, shapes, what=f"client {cid} delta")
        for key in sorted(client_delta):
            dtype = client_delta[key].dtype
            if not dtype.is_floating_point:
                raise InvalidSubmission(
                    f"client {cid}: tensor {key!r} has dtype {dtype}; deltas must be floating"
                )
        prepared: dict[str, Prepared] = {}
        for key in sorted(shapes):
            gen = generator if generator is not None else self._generator(cid, key)
            prepared[key] = self._prepare(key, client_delta[key], gen)
        sparse = {k: p for k, p in prepared.items() if isinstance(p.data, SparseTensor)}
        if sparse and self.groups_sparse:
            self._pending_sparse.append((sparse, w))
        else:
            for key, item in sparse.items():
                self._fold_sparse(key, item, w)
        dense = {k: p for k, p in prepared.items() if k not in sparse}
        if dense:
            self._pending.append((dense, w))
        self._num_clients += 1
        self._total_weight += w
        if len(self._pending_sparse) >= self.group_size:
            self._flush_sparse()
        if len(self._pending) >= self.group_size:
            self._flush()
        self._accepted(cid, w)

    def _admit(self, client_id: str | int, client_delta: ClientDelta) -> ClientDelta:
        """The delta :meth:`add` folds for this client, before its weight, shapes and dtypes are checked;
        raise :class:`AggregatorStateError` to refuse the client. The default: the delta as given."""
        return client_delta

    def _accepted(self, client_id: str | int, weight: float) -> None:
        """Called once :meth:`add` has accepted and folded the client's delta (default: nothing)."""
        return None

    def finalize(self) -> dict[str, torch.Tensor]:
        """The merged delta: name → fp32 tensor with the reference shape."""
        shapes = self._require_begun()
        if self._num_clients == 0:
            raise AggregatorStateError(f"{self.name}: finalize() before any add(); no client delta to merge")
        self._flush()
        out = {key: self._finalize_tensor(key, shape).reshape(shape) for key, shape in shapes.items()}
        self._finalized = True
        self._acc = {}
        return out

    def current(self) -> dict[str, torch.Tensor]:
        """The merge of the deltas added so far, without ending the merge: fresh fp32 tensors equal to
        what :meth:`finalize` would return now, while further :meth:`add` calls keep folding.

        Pending dense deltas are folded first (as ``finalize`` does); each tensor is then finalised
        from a copy of its accumulators, so the extra memory is one tensor's accumulators at a time.
        Streaming methods only (their whole state is the accumulators); buffering methods and methods
        with their own ``finalize`` raise :class:`AggregatorStateError`.
        """
        shapes = self._require_begun()
        self._require_accumulator_state("current()")
        if self._num_clients == 0:
            raise AggregatorStateError(f"{self.name}: current() before any add(); no client delta to merge")
        self._flush()
        out: dict[str, torch.Tensor] = {}
        for key, shape in shapes.items():
            live = self._acc.get(key)
            if live is not None:  # swapped inside the dict: wrappers sharing it (norm_bounded) see the copy
                self._acc[key] = [a.clone() for a in live]
            try:
                out[key] = self._finalize_tensor(key, shape).reshape(shape)
            finally:
                if live is not None:
                    self._acc[key] = live
                else:
                    self._acc.pop(key, None)
        return out

    def accumulator_state(self) -> dict[str, list[torch.Tensor]]:
        """Name → this merge's flat fp32 accumulators, after folding pending deltas. The tensors are the
        live ones (not copies): copy them to persist. With :attr:`num_clients` and
        :attr:`total_weight` they are everything needed to :meth:`resume` the merge."""
        self._require_begun()
        self._require_accumulator_state("accumulator_state()")
        self._flush()
        return {k: list(v) for k, v in self._acc.items()}

    @property
    def total_weight(self) -> float:
        """Σ of the weights added so far."""
        return self._total_weight

    def resume(
        self,
        reference_shapes: Mapping[str, Sequence[int]],
        accumulators: Mapping[str, Sequence[torch.Tensor]],
        *,
        num_clients: int,
        total_weight: float,
    ) -> None:
        """Begin a merge that continues from :meth:`accumulator_state` (and the counts) of another.

        The accumulators are taken over, not copied (flat fp32, contiguous, on ``device``; one list of
        the same length per tensor name); further :meth:`add` calls fold into them.
        """
        self.begin(reference_shapes)
        self._require_accumulator_state("resume()")
        assert self._shapes is not None
        unknown = sorted(set(accumulators) - set(self._shapes))
        if unknown:
            raise AggregatorStateError(f"{self.name}: accumulators for unknown tensors {unknown}")
        counts = {len(v) for v in accumulators.values()}
        if len(counts) > 1:
            raise AggregatorStateError(
                f"{self.name}: tensors have different numbers of accumulators {counts}"
            )
        for key, accs in accumulators.items():
            numel = math.prod(self._shapes[key])
            for a in accs:
                if a.dtype != torch.float32 or a.dim() != 1 or a.numel() != numel or not a.is_contiguous():
                    raise AggregatorStateError(
                        f"{self.name}: accumulator of {key!r} must be a flat contiguous fp32 tensor of "
                        f"{numel} elements, got {a.dtype} {tuple(a.shape)}"
                    )
                if a.device != self.device:
                    raise AggregatorStateError(
                        f"{self.name}: accumulator of {key!r} is on {a.device}, not {self.device}"
                    )
        if int(num_clients) < 0 or not math.isfinite(float(total_weight)) or float(total_weight) < 0:
            raise AggregatorStateError(
                f"{self.name}: cannot resume with num_clients={num_clients!r}, total_weight={total_weight!r}"
            )
        self._acc.clear()  # in place: wrappers (norm_bounded) share this dict
        self._acc.update({k: list(v) for k, v in accumulators.items()})
        self._num_clients, self._total_weight = int(num_clients), float(total_weight)

    # ------------------------------------------------------------------ subclass hooks
    def _prepare(self, key: str, x: DeltaTensor, generator: torch.Generator) -> Prepared:
        """Per-client step before folding (trim, random drop, ...). Default: none."""
        return Prepared(x)

    @abstractmethod
    def _fold_dense(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        """Fold a group of dense client tensors for one parameter into the accumulators."""

    @abstractmethod
    def _fold_sparse(self, key: str, item: Prepared, weight: float) -> None:
        """Fold one client's sparse tensor for one parameter into the accumulators."""

    def _fold_sparse_group(self, key: str, items: list[Prepared], weights: list[float]) -> None:
        """Fold a group of sparse client tensors for one parameter, in order (used when
        ``groups_sparse``). Default: :meth:`_fold_sparse` for each."""
        for item, w in zip(items, weights, strict=True):
            self._fold_sparse(key, item, w)

    @abstractmethod
    def _finalize_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The merged flat fp32 tensor for one parameter."""

    # ------------------------------------------------------------------ helpers for subclasses
    def _accumulators(self, key: str, count: int) -> list[torch.Tensor]:
        """``count`` flat fp32 zero accumulators for ``key``, allocated on first use."""
        if key not in self._acc:
            assert self._shapes is not None
            numel = math.prod(self._shapes[key])
            self._acc[key] = [zeros(numel, self.device) for _ in range(count)]
        return self._acc[key]

    def _generator(self, client: str | int, key: str) -> torch.Generator:
        return derive_generator(self.seed, self.round, client, key)

    def _require_accumulator_state(self, what: str) -> None:
        if not self.streaming or type(self).finalize is not Aggregator.finalize:
            raise AggregatorStateError(
                f"{self.name}: {what} needs a streaming method whose state is its accumulators; "
                f"{self.name} buffers deltas or finalises in its own way"
            )

    def _require_begun(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            raise AggregatorStateError(f"{self.name}: call begin(reference_shapes) before add()/finalize()")
        if self._finalized:
            raise AggregatorStateError(f"{self.name}: this merge is finalized; call begin() to start another")
        return self._shapes

    def _flush_sparse(self) -> None:
        """Fold the pending sparse group, tensor by tensor, clients in arrival order."""
        pending, self._pending_sparse = self._pending_sparse, []
        keys: dict[str, None] = {}
        for items, _ in pending:
            keys.update(dict.fromkeys(items))
        for key in keys:
            held = [(items[key], w) for items, w in pending if key in items]
            self._fold_sparse_group(key, [it for it, _ in held], [w for _, w in held])

    def _flush(self) -> None:
        """Fold every pending group: sparse first (their clients were added before the dense group
        folds, as with immediate sparse folds), then dense."""
        self._flush_sparse()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        keys: dict[str, None] = {}  # a client whose tensor is sparse (e.g. left out: zero change)
        for items, _ in pending:  # holds no dense item for it: each tensor folds the clients holding it
            keys.update(dict.fromkeys(items))
        for key in keys:
            held = [(items[key], w) for items, w in pending if key in items]
            self._fold_dense(key, [it for it, _ in held], [w for _, w in held])


def dense_of(x: DeltaTensor) -> torch.Tensor:
    return x.to_dense() if isinstance(x, SparseTensor) else x


# ---------------------------------------------------------------------- registry
REGISTRY: Registry[Aggregator] = Registry("aggregator")
register = REGISTRY.register  # class decorator: make an aggregator available by its ``name``
available = REGISTRY.names  # names of every registered aggregator
get = REGISTRY.get
create = REGISTRY.create  # instantiate by name, reporting unknown or invalid parameters clearly


def merge(
    name: str,
    deltas: Sequence[ClientDelta],
    weights: Sequence[float] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """One-shot merge: ``create(name, **params)``, begin, add each delta (client ids 0..N−1), finalize."""
    if not deltas:
        raise ConfigError("merge() needs at least one delta")
    ws = [1.0] * len(deltas) if weights is None else list(weights)
    if len(ws) != len(deltas):
        raise ConfigError(f"got {len(deltas)} deltas but {len(ws)} weights")
    agg = create(name, **params)
    agg.begin({k: tuple(v.shape) for k, v in deltas[0].items()})
    for i, (delta, w) in enumerate(zip(deltas, ws, strict=True)):
        agg.add(delta, w, client_id=i)
    return agg.finalize()
