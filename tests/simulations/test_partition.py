from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.errors import ConfigError
from fedmerge_simulations.partition import (
    PARTITIONERS,
    PartitionSummary,
    partition,
    partition_summary,
    quantity_sizes,
)

LABELS = np.random.default_rng(123).integers(0, 10, size=2000)
ARGS: dict[str, dict[str, float]] = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "pathological": {"k": 2},
    "quantity": {"exponent": 1.0},
    "task": {},
}


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_index_assigned_exactly_once(name: str) -> None:
    parts = partition(name, LABELS, 20, seed=0, **ARGS[name])
    assert len(parts) == 20
    assert_exact_cover(parts, LABELS.size)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_same_seed_same_partition_other_seed_other_partition(name: str) -> None:
    a = partition(name, LABELS, 20, seed=7, **ARGS[name])
    b = partition(name, LABELS, 20, seed=7, **ARGS[name])
    c = partition(name, LABELS, 20, seed=8, **ARGS[name])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=100, max_value=400),
    classes=st.integers(min_value=1, max_value=8),
    clients=st.integers(min_value=1, max_value=10),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    name=st.sampled_from(["iid", "dirichlet", "pathological", "quantity"]),
)
def test_exact_cover_property(n: int, classes: int, clients: int, seed: int, name: str) -> None:
    labels = np.arange(n) % classes
    per_name: dict[str, dict[str, float]] = {"dirichlet": {"alpha": 0.5}, "pathological": {"k": classes}}
    args = per_name.get(name, {})
    assert_exact_cover(partition(name, labels, clients, seed, **args), n)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    skewed = partition_summary(LABELS, partition("dirichlet", LABELS, 20, 0, alpha=0.1))
    mild = partition_summary(LABELS, partition("dirichlet", LABELS, 20, 0, alpha=100.0))
    # α=0.1: a client's most frequent class dominates; α=100: close to the uniform 10 %.
    top_share_skewed = np.mean([max(r) / sum(r) for r in skewed.counts if sum(r)])
    top_share_mild = np.mean([max(r) / sum(r) for r in mild.counts])
    assert top_share_skewed > 0.5
    assert top_share_mild < 0.2
    major = [sum(1 for c in r if c >= 0.1 * sum(r)) for r in skewed.counts if sum(r)]
    assert np.mean(major) < 3
    assert min(mild.classes_per_client) == 10


def test_dirichlet_min_partition_size_is_respected_or_refused() -> None:
    parts = partition("dirichlet", LABELS, 20, 0, alpha=0.1, min_partition_size=20)
    assert min(p.size for p in parts) >= 20
    with pytest.raises(ConfigError, match="min_partition_size"):
        partition("dirichlet", LABELS, 20, 0, alpha=0.01, min_partition_size=99, max_tries=5)


def test_dirichlet_self_balancing_evens_sizes_and_keeps_skew() -> None:
    plain = partition("dirichlet", LABELS, 20, 0, alpha=0.1)
    balanced = partition("dirichlet", LABELS, 20, 0, alpha=0.1, self_balancing=True)
    assert_exact_cover(balanced, LABELS.size)
    assert np.std([p.size for p in balanced]) < np.std([p.size for p in plain])
    summary = partition_summary(LABELS, balanced)
    assert np.mean([max(r) / sum(r) for r in summary.counts if sum(r)]) > 0.5


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        partition("dirichlet", LABELS, 5, 0, alpha=alpha)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_k_classes_per_client(k: int) -> None:
    summary = partition_summary(LABELS, partition("pathological", LABELS, 20, 0, k=k))
    assert summary.classes_per_client == [k] * 20


def test_pathological_refuses_uncoverable_classes() -> None:
    with pytest.raises(ConfigError, match="cannot cover all 10 classes"):
        partition("pathological", LABELS, 3, 0, k=2)
    with pytest.raises(ConfigError, match="k=11"):
        partition("pathological", LABELS, 20, 0, k=11)


def test_quantity_skew_gives_power_law_sizes() -> None:
    parts = partition("quantity", LABELS, 10, 0, exponent=1.5, min_size=5)
    sizes = sorted((p.size for p in parts), reverse=True)
    assert sizes[0] > 10 * sizes[-1]
    assert sizes == quantity_sizes(LABELS.size, 10, exponent=1.5, min_size=5)
    assert min(sizes) >= 5
    # Ratios follow (i+1)^-1.5 on the part above min_size, up to rounding.
    extra = np.array(sizes) - 5
    assert extra[0] / extra[3] == pytest.approx(4**1.5, rel=0.02)


def test_quantity_with_zero_exponent_is_equal_sizes() -> None:
    sizes = [p.size for p in partition("quantity", LABELS, 8, 0, exponent=0.0)]
    assert max(sizes) - min(sizes) <= 1


def test_task_per_client_gives_one_task_each_and_shares_tasks_round_robin() -> None:
    tasks = np.repeat(np.arange(4), 50)
    parts = partition("task", tasks, 10, 3)
    held = [set(tasks[p].tolist()) for p in parts]
    assert all(len(h) == 1 for h in held)
    per_task = {t: sum(1 for h in held if h == {t}) for t in range(4)}
    assert sorted(per_task.values()) == [2, 2, 3, 3]
    with pytest.raises(ConfigError, match="at least one client per task"):
        partition("task", tasks, 3, 0)


def test_unknown_partitioner_and_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown partitioner 'zipf'.*dirichlet"):
        partition("zipf", LABELS, 4, 0)
    with pytest.raises(ConfigError, match="partitioner 'iid'"):
        partition("iid", LABELS, 4, 0, alpha=0.1)
    with pytest.raises(ConfigError, match="exceeds the 3 samples"):
        partition("iid", [0, 1, 2], 4, 0)
    with pytest.raises(ConfigError, match="integers"):
        partition("iid", [0.5, 1.5], 1, 0)


def test_summary_counts_json_and_png(tmp_path: Path) -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    summary = partition_summary(labels, parts, class_names=["a", "b", "c"])
    assert summary.counts == [[1, 0, 1], [1, 1, 2]]
    assert summary.sizes == [2, 4]
    assert summary.classes_per_client == [2, 3]

    path = summary.save_json(tmp_path / "out" / "partition.json")
    assert json.loads(path.read_text())["counts"] == [[1, 0, 1], [1, 1, 2]]
    assert PartitionSummary.load_json(path) == summary

    png = summary.plot(tmp_path / "partition.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100
