"""``Aggregator.current()`` (the merge so far, without ending it) and ``accumulator_state()`` /
``resume()`` (continue a merge from its accumulators), over every streaming aggregator."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import Aggregator, available, create, get, merge
from fedmerge.errors import AggregatorStateError

SHAPES = {"layer.weight": (12, 20), "layer.bias": (20,), "emb": (7, 3, 2)}
STREAMING = [n for n in available() if get(n).streaming and get(n).finalize is Aggregator.finalize]
OTHERS = [n for n in available() if n not in STREAMING]


def deltas(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_streaming_methods_are_covered() -> None:
    assert {"fedavg", "task_arithmetic", "ties", "magmax", "dare_linear", "norm_bounded"} <= set(STREAMING)
    assert {"median", "trimmed_mean"} <= set(OTHERS)


@pytest.mark.parametrize("name", STREAMING)
def test_current_is_the_merge_so_far_and_does_not_end_the_merge(name: str) -> None:
    ds, ws = deltas(5, seed=1), [1.0, 3.0, 2.0, 0.5, 4.0]
    agg = create(name, group_size=2)  # some deltas are still pending when current() is called
    agg.begin({k: v.shape for k, v in ds[0].items()})
    for t, (d, w) in enumerate(zip(ds, ws, strict=True), 1):
        agg.add(d, w, client_id=t - 1)
        now = agg.current()
        assert same(now, agg.current())  # asking twice changes nothing
        expected = merge(name, ds[:t], ws[:t])
        for k in now:
            torch.testing.assert_close(now[k], expected[k], atol=1e-6, rtol=1e-6)
    assert same(agg.finalize(), now)


@pytest.mark.parametrize("name", STREAMING)
def test_resume_from_the_accumulators_continues_exactly(name: str) -> None:
    ds, ws = deltas(4, seed=2), [2.0, 1.0, 1.0, 3.0]
    shapes = {k: v.shape for k, v in ds[0].items()}
    straight = create(name, group_size=1)
    straight.begin(shapes)
    first = create(name, group_size=1)
    first.begin(shapes)
    for i in range(2):
        straight.add(ds[i], ws[i], client_id=i)
        first.add(ds[i], ws[i], client_id=i)
    saved = {k: [a.clone() for a in v] for k, v in first.accumulator_state().items()}
    resumed = create(name, group_size=1)
    resumed.resume(shapes, saved, num_clients=first.num_clients, total_weight=first.total_weight)
    for i in range(2, 4):
        straight.add(ds[i], ws[i], client_id=i)
        resumed.add(ds[i], ws[i], client_id=i)
    assert resumed.num_clients == 4 and same(resumed.finalize(), straight.finalize())


def test_resume_refuses_accumulators_that_do_not_fit() -> None:
    agg = create("task_arithmetic")
    with pytest.raises(AggregatorStateError, match="flat contiguous fp32"):
        agg.resume({"w": (3, 2)}, {"w": [torch.zeros(5)]}, num_clients=1, total_weight=1.0)
    with pytest.raises(AggregatorStateError, match="unknown tensors"):
        create("task_arithmetic").resume(
            {"w": (3,)}, {"v": [torch.zeros(3)]}, num_clients=1, total_weight=1.0
        )


@pytest.mark.parametrize("name", OTHERS)
def test_buffering_methods_refuse_current(name: str) -> None:
    agg = create(name)
    ds = deltas(min(3, getattr(get(name), "exact_models", 3)), seed=3)  # slerp takes two
    agg.begin({k: v.shape for k, v in ds[0].items()})
    for i, d in enumerate(ds):
        agg.add(d, 1.0, client_id=i)
    with pytest.raises(AggregatorStateError, match="streaming"):
        agg.current()


def test_current_before_any_delta_is_an_error() -> None:
    agg = create("fedavg")
    agg.begin(SHAPES)
    with pytest.raises(AggregatorStateError, match="before any add"):
        agg.current()
