"""Seeded non-IID partitioners: which sample indices each simulated client holds.

Every partitioner is a pure function ``(labels, num_clients, seed, **args) -> list[np.ndarray]`` that
returns, per client, the sorted int64 indices of its samples; together the lists cover every index
exactly once (none is dropped, none is shared). Randomness comes only from
``np.random.default_rng(seed)``: the same arguments always give the same partition.

The algorithms are those of ``flwr_datasets.partitioner`` (``IidPartitioner``, ``DirichletPartitioner``,
``PathologicalPartitioner``), which also seed a ``numpy`` ``default_rng`` per partitioner; they are
re-implemented here on plain label arrays because ``flwr-datasets`` 0.6.1 pins ``datasets<5`` and thus
``huggingface_hub<2``, which conflicts with the ``transformers`` stack this project installs. Quantity
skew and task-per-client, which ``flwr_datasets`` does not offer in this form, are our own.

=================  ==================================================================================
``iid``            a seeded permutation cut into ``num_clients`` near-equal parts
``dirichlet``      label skew: per class c, proportions p_c ~ Dir(α·1_N) split that class's samples
                   (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution ...");
                   resampled until every client has ``min_partition_size`` samples
``pathological``   k classes per client, each class split evenly among the clients holding it
                   (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks ...")
``quantity``       power-law sizes n_i ∝ (rank_i)^(−γ), labels IID within a client
``task``           task-per-client: ``labels`` are task ids; client i holds task T[(i + s) mod |T|];
                   clients sharing a task split its samples IID
=================  ==================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmerge.errors import ConfigError

Partition = list[npt.NDArray[np.int64]]
"""Per client, the sorted indices of its samples."""

Labels = npt.ArrayLike


def _labels(labels: Labels) -> npt.NDArray[np.int64]:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"labels must be integers (class or task ids), got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_clients(num_clients: int, num_samples: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be ≥ 1, got {num_clients}")
    if num_clients > num_samples:
        raise ConfigError(
            f"num_clients={num_clients} exceeds the {num_samples} samples: every client needs at least one; "
            "use fewer clients or more data"
        )


def _finish(parts: Sequence[npt.ArrayLike]) -> Partition:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: Labels, num_clients: int, seed: int) -> Partition:
    """Shuffle all indices with ``default_rng(seed)``; cut into near-equal parts (sizes differ ≤ 1)."""
    y = _labels(labels)
    _check_clients(num_clients, y.size)
    perm = np.random.default_rng(seed).permutation(y.size)
    return _finish(np.array_split(perm, num_clients))


def dirichlet(
    labels: Labels,
    num_clients: int,
    seed: int,
    *,
    alpha: float = 0.5,
    min_partition_size: int = 1,
    self_balancing: bool = False,
    max_tries: int = 1000,
) -> Partition:
    """Label skew: for each class c draw p_c ~ Dir(α·1_N) and give client i a fraction p_c[i] of class c.

    Small α concentrates each class on few clients (α=0.1: most clients see 1–3 classes); α → ∞ tends
    to IID. Cut points are ⌊cumsum(p_c)·n_c⌋ as in ``flwr_datasets.DirichletPartitioner``. With
    ``self_balancing`` (flwr's default, off here), a client already holding more than n/N samples gets
    p_c[i] = 0 for the classes that follow (p_c renormalised), which evens out sizes at the price of
    skew that depends on class order. The whole draw is repeated until every client holds at least
    ``min_partition_size`` samples; after ``max_tries`` draws a :class:`ConfigError` says what to relax.
    """
    y = _labels(labels)
    _check_clients(num_clients, y.size)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if min_partition_size < 0 or min_partition_size * num_clients > y.size:
        raise ConfigError(
            f"min_partition_size={min_partition_size} × {num_clients} clients exceeds the {y.size} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    for _ in range(max_tries):
        parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_clients)]
        for idx in members:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            if self_balancing:
                full = np.array([sum(c.size for c in p) > y.size / num_clients for p in parts])
                proportions = np.where(full, 0.0, proportions)
                proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * idx.size).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(p.size for p in merged) >= min_partition_size:
            return _finish(merged)
    raise ConfigError(
        f"dirichlet(alpha={alpha}) gave a client fewer than min_partition_size={min_partition_size} samples "
        f"in {max_tries} draws; lower min_partition_size, raise alpha or use fewer clients"
    )


def pathological(labels: Labels, num_clients: int, seed: int, *, k: int = 2) -> Partition:
    """k classes per client: client i holds classes π[(i·k + j) mod C], j < k, for a seeded permutation π.

    Each class's samples are shuffled and split evenly among the clients that hold it, so every client
    sees at most k classes (exactly k when k ≤ C) and every sample is assigned. Requires
    ``num_clients · k ≥ C`` so no class is left without a holder.
    """
    y = _labels(labels)
    _check_clients(num_clients, y.size)
    classes = np.unique(y)
    if not 1 <= k <= classes.size:
        raise ConfigError(f"pathological k={k} must be between 1 and the number of classes ({classes.size})")
    if num_clients * k < classes.size:
        raise ConfigError(
            f"pathological: {num_clients} clients × k={k} classes cannot cover all {classes.size} classes; "
            f"raise k to ≥ {-(-classes.size // num_clients)} or add clients"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[int(order[(client * k + j) % classes.size])].append(client)
    parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_clients)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        clients = rng.permutation(holders[int(c)])  # who gets the smaller shares varies by class
        for client, chunk in zip(clients, np.array_split(idx, clients.size), strict=True):
            parts[client].append(chunk)
    merged = [np.concatenate(p) for p in parts]
    if min(p.size for p in merged) == 0:
        raise ConfigError(
            f"pathological k={k}: a client received no samples (a class has fewer samples than holders); "
            "use fewer clients or a larger k"
        )
    return _finish(merged)


def quantity_sizes(num_samples: int, num_clients: int, *, exponent: float, min_size: int) -> list[int]:
    """Power-law sizes: n_i = min_size + share_i of the rest, share_i ∝ (i+1)^(−exponent), largest first.

    Rounding is by largest remainder, so Σ n_i = num_samples exactly.
    """
    if exponent < 0 or not np.isfinite(exponent):
        raise ConfigError(f"quantity exponent must be a finite number ≥ 0, got {exponent!r}")
    if min_size < 1 or min_size * num_clients > num_samples:
        raise ConfigError(
            f"quantity min_size={min_size} must be ≥ 1 and fit {num_clients} clients in {num_samples} samples"
        )
    weights = np.arange(1, num_clients + 1, dtype=np.float64) ** (-exponent)
    rest = num_samples - min_size * num_clients
    exact = weights / weights.sum() * rest
    sizes = np.floor(exact).astype(np.int64)
    leftover = rest - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:leftover]] += 1
    return [int(s) + min_size for s in sizes]


def quantity(
    labels: Labels, num_clients: int, seed: int, *, exponent: float = 1.0, min_size: int = 1
) -> Partition:
    """Quantity skew: client sizes follow :func:`quantity_sizes` (exponent γ; 0 gives equal sizes),
    assigned to clients in a seeded random order; which samples a client gets is IID."""
    y = _labels(labels)
    _check_clients(num_clients, y.size)
    sizes = quantity_sizes(y.size, num_clients, exponent=exponent, min_size=min_size)
    rng = np.random.default_rng(seed)
    sizes = [sizes[i] for i in rng.permutation(num_clients)]
    perm = rng.permutation(y.size)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def task_per_client(labels: Labels, num_clients: int, seed: int) -> Partition:
    """Task-per-client: ``labels`` are task ids; client i holds task T[(i + s) mod |T|] for a seeded shift s.

    With more clients than tasks, the clients sharing a task split its samples IID; with fewer, the
    tasks left over are not assigned and a :class:`ConfigError` says so (every sample must be held).
    """
    y = _labels(labels)
    _check_clients(num_clients, y.size)
    tasks = np.unique(y)
    if num_clients < tasks.size:
        raise ConfigError(
            f"task-per-client needs at least one client per task: {num_clients} clients for {tasks.size} "
            "tasks; add clients or restrict the data to fewer tasks"
        )
    rng = np.random.default_rng(seed)
    shift = int(rng.integers(tasks.size))
    holders: dict[int, list[int]] = {int(t): [] for t in tasks}
    for client in range(num_clients):
        holders[int(tasks[(client + shift) % tasks.size])].append(client)
    parts: list[npt.NDArray[np.int64]] = [np.empty(0, dtype=np.int64)] * num_clients
    for t in tasks:
        idx = rng.permutation(np.flatnonzero(y == t))
        clients = holders[int(t)]
        if idx.size < len(clients):
            raise ConfigError(
                f"task {int(t)} has {idx.size} samples for {len(clients)} clients; use fewer clients"
            )
        for client, chunk in zip(clients, np.array_split(idx, len(clients)), strict=True):
            parts[client] = chunk
    return _finish(parts)


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "pathological": pathological,
    "quantity": quantity,
    "task": task_per_client,
}
"""Name → partitioner; every entry takes ``(labels, num_clients, seed, **args)``."""


def partition(name: str, labels: Labels, num_clients: int, seed: int, **args: Any) -> Partition:
    """Dispatch to the partitioner registered under ``name`` (see :data:`PARTITIONERS`)."""
    try:
        fn = PARTITIONERS[name]
    except KeyError:
        raise ConfigError(f"unknown partitioner {name!r}; choose one of {sorted(PARTITIONERS)}") from None
    try:
        return fn(labels, num_clients, seed, **args)
    except TypeError as exc:  # an argument the partitioner does not take
        raise ConfigError(
            f"partitioner {name!r}: {exc}; check its arguments in simulations.partition"
        ) from exc


@dataclass(frozen=True)
class PartitionSummary:
    """Per-client class histogram of a partition: ``counts[i][j]`` samples of ``classes[j]`` on client i."""

    classes: list[int]
    counts: list[list[int]]
    class_names: list[str] | None = None

    @property
    def sizes(self) -> list[int]:
        return [sum(row) for row in self.counts]

    @property
    def classes_per_client(self) -> list[int]:
        return [sum(1 for c in row if c > 0) for row in self.counts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "class_names": self.class_names,
            "counts": self.counts,
            "sizes": self.sizes,
            "classes_per_client": self.classes_per_client,
        }

    def save_json(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return out

    @classmethod
    def load_json(cls, path: str | Path) -> PartitionSummary:
        data = json.loads(Path(path).read_text())
        return cls(classes=data["classes"], counts=data["counts"], class_names=data.get("class_names"))

    def plot(self, path: str | Path, *, title: str = "samples per client by class") -> Path:
        """Write a stacked bar chart (one bar per client, one colour per class) as PNG."""
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        counts = np.asarray(self.counts, dtype=np.int64).reshape(len(self.counts), len(self.classes))
        names = self.class_names or [str(c) for c in self.classes]
        fig = Figure(figsize=(max(4.0, 0.35 * counts.shape[0] + 2), 3.5))  # no pyplot: no global state
        ax = fig.subplots()
        bottom = np.zeros(counts.shape[0])
        cmap = matplotlib.colormaps["tab20" if counts.shape[1] > 10 else "tab10"]
        for j, name in enumerate(names):
            ax.bar(
                np.arange(counts.shape[0]), counts[:, j], bottom=bottom, color=cmap(j % cmap.N), label=name
            )
            bottom += counts[:, j]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("client")
        ax.set_ylabel("samples")
        ax.set_title(title)
        ax.legend(title="class", fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        return out


def partition_summary(
    labels: Labels, parts: Partition, *, class_names: Sequence[str] | None = None
) -> PartitionSummary:
    """Count, per client, how many of its samples carry each label (labels absent everywhere included)."""
    y = _labels(labels)
    classes = np.unique(y)
    position = {int(c): j for j, c in enumerate(classes)}
    counts = []
    for idx in parts:
        row = [0] * classes.size
        values, freq = np.unique(y[np.asarray(idx, dtype=np.int64)], return_counts=True)
        for v, f in zip(values, freq, strict=True):
            row[position[int(v)]] = int(f)
        counts.append(row)
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) != classes.size:
        raise ConfigError(f"class_names has {len(names)} names for {classes.size} classes")
    return PartitionSummary(classes=[int(c) for c in classes], counts=counts, class_names=names)
