"""Grouped sparse folds of the sign consensus family: the block-wise kernel equals one-by-one folds
bit for bit, and the aggregator's sparse grouping changes no result and keeps its memory bounds."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from fedmerge.aggregators import create
from fedmerge.aggregators import kernels as K
from fedmerge.aggregators.dare_ties import DareTies
from fedmerge.aggregators.ties import Ties
from fedmerge.delta import SparseTensor

# not a multiple of SPARSE_BLOCK: a partial last block
P = 3 * K.SPARSE_BLOCK + 1234


def _client(
    seed: int, numel: int, density: float, *, shuffled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of one heavy-tailed client: unique indices, sorted unless ``shuffled``."""
    g = torch.Generator().manual_seed(seed)
    nnz = int(numel * density)
    idx = torch.randperm(numel, generator=g)[:nnz]
    if not shuffled:
        idx = idx.sort().values
    vals = torch.randn(nnz, generator=g) / torch.rand(nnz, generator=g).clamp(min=0.05)
    vals[::11] = 0.0  # explicit zeros are folded as nothing
    if nnz > 20:
        vals[5] = -vals[3]  # magnitude ties at the threshold
    return idx, vals


def _one_by_one(
    clients: list[tuple[torch.Tensor, torch.Tensor]], thr: list[float], ws: list[float], mode: int, numel: int
) -> list[torch.Tensor]:
    acc = [K.zeros(numel, torch.device("cpu")) for _ in range(5)]
    for (idx, vals), t, w in zip(clients, thr, ws, strict=True):
        K.sign_split_sparse(idx, vals, t, 0.5 * w, w, 1.0 + w, mode, acc)
    return acc


def _grouped(
    clients: list[tuple[torch.Tensor, torch.Tensor]], thr: list[float], ws: list[float], mode: int, numel: int
) -> list[torch.Tensor]:
    acc = [K.zeros(numel, torch.device("cpu")) for _ in range(5)]
    K.sign_split_sparse_group(
        [i for i, _ in clients],
        [v for _, v in clients],
        thr,
        [0.5 * w for w in ws],
        ws,
        [1.0 + w for w in ws],
        mode,
        acc,
    )
    return acc


def _assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", [K.VOTE_TOTAL, K.VOTE_FREQUENCY])
@pytest.mark.parametrize("n_clients", [1, 2, 7])
def test_group_kernel_equals_one_by_one_folds(mode: int, n_clients: int) -> None:
    clients = [_client(s, P, 0.1 + 0.05 * s) for s in range(n_clients)]
    thr = [0.0, 0.3, 1.0, 0.0, 2.5, 0.1, 0.7][:n_clients]
    ws = [1.0 + 0.37 * s for s in range(n_clients)]
    ref = _one_by_one(clients, thr, ws, mode, P)
    assert all(bool(a.abs().sum() > 0) for a in ref)
    _assert_identical(_grouped(clients, thr, ws, mode, P), ref)
    with K.torch_path():
        _assert_identical(_grouped(clients, thr, ws, mode, P), ref)


@pytest.mark.parametrize("numel", [1, 100, K.SPARSE_BLOCK, 2 * K.SPARSE_BLOCK])
def test_group_kernel_edge_sizes(numel: int) -> None:
    clients = [_client(s, numel, 0.5) for s in range(3)]
    clients[0] = (clients[0][0][:0], clients[0][1][:0])  # an empty client
    if numel > 1:  # the last coordinate and the first are both hit
        idx = torch.tensor([0, numel - 1])
        clients.append((idx, torch.tensor([1.5, -2.0])))
    thr = [0.0] * len(clients)
    ws = [1.0, 2.0, 3.0, 4.0][: len(clients)]
    _assert_identical(
        _grouped(clients, thr, ws, K.VOTE_TOTAL, numel), _one_by_one(clients, thr, ws, K.VOTE_TOTAL, numel)
    )


def test_group_kernel_all_empty_and_no_clients() -> None:
    empty = (torch.empty(0, dtype=torch.int64), torch.empty(0))
    acc = _grouped([empty, empty], [0.0, 0.0], [1.0, 1.0], K.VOTE_TOTAL, P)
    assert all(not bool(a.any()) for a in acc)
    acc = _grouped([], [], [], K.VOTE_TOTAL, P)
    assert all(not bool(a.any()) for a in acc)


def test_group_kernel_unsorted_and_int32_indices() -> None:
    clients = [_client(s, P, 0.2, shuffled=True) for s in range(4)]
    assert not bool((clients[0][0][1:] > clients[0][0][:-1]).all())
    thr = [0.2, 0.0, 0.5, 0.0]
    ws = [1.0, 3.0, 2.0, 5.0]
    ref = _one_by_one(clients, thr, ws, K.VOTE_FREQUENCY, P)
    _assert_identical(_grouped(clients, thr, ws, K.VOTE_FREQUENCY, P), ref)
    narrow = [(i.to(torch.int32), v.to(torch.float16).float()) for i, v in clients]
    ref_narrow = _one_by_one(narrow, thr, ws, K.VOTE_FREQUENCY, P)
    _assert_identical(_grouped(narrow, thr, ws, K.VOTE_FREQUENCY, P), ref_narrow)
    halves = [(i.to(torch.int32), v.to(torch.float16)) for i, v in clients]  # values of any float dtype
    _assert_identical(_grouped(halves, thr, ws, K.VOTE_FREQUENCY, P), ref_narrow)


def test_group_kernel_serial_and_parallel_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    clients = [_client(s, P, 0.3) for s in range(5)]
    thr, ws = [0.1] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    serial = _grouped(clients, thr, ws, K.VOTE_TOTAL, P)
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 0)
    _assert_identical(_grouped(clients, thr, ws, K.VOTE_TOTAL, P), serial)


def test_group_kernel_rejects_mismatched_lengths() -> None:
    idx, vals = _client(0, P, 0.1)
    acc = [K.zeros(P, torch.device("cpu")) for _ in range(5)]
    with pytest.raises(ValueError, match="indices but"):
        K.sign_split_sparse_group([idx], [vals[:-1]], [0.0], [1.0], [1.0], [1.0], K.VOTE_TOTAL, acc)


# ---------------------------------------------------------------------- the aggregators


class TiesOneByOne(Ties):
    """TIES folding every sparse tensor at ``add`` (the behaviour without sparse grouping)."""

    groups_sparse: ClassVar[bool] = False


class DareTiesOneByOne(DareTies):
    groups_sparse: ClassVar[bool] = False


SHAPES = {"a.weight": (64, 97), "b.bias": (300,), "c.big": (P,)}


def _deltas(n: int, *, mixed: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        d: dict[str, Any] = {}
        for j, (key, shape) in enumerate(sorted(SHAPES.items())):
            numel = 1
            for s in shape:
                numel *= s
            idx, vals = _client(100 * i + j, numel, 0.1 + 0.02 * i)
            if i == 2:  # an empty client tensor
                idx, vals = idx[:0], vals[:0]
            sparse = SparseTensor(indices=idx, values=vals, shape=shape)
            # mixed: some clients send dense deltas, the others sparse ones (same keys)
            d[key] = sparse.to_dense() if mixed and i % 3 == 1 else sparse
        out.append(d)
    return out


def _run(cls: type, deltas: list[dict[str, Any]], group_size: int, **params: Any) -> dict[str, torch.Tensor]:
    agg = cls(group_size=group_size, seed=3, **params)
    agg.begin(SHAPES)
    for i, d in enumerate(deltas):
        agg.add(d, weight=1.0 + i % 4, client_id=i)
        assert len(agg._pending_sparse) < group_size  # never more than one group of sparse deltas held
        if group_size == 1:
            assert not agg._pending_sparse
    return agg.finalize()


@pytest.mark.parametrize("group_size", [1, 3, 8, 100])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize(
    "params",
    [
        {"density": 1.0, "divisor": "weight"},
        {"density": 0.5, "sign_election": "frequency", "vote_weighting": "weighted"},
        {"density": 0.3, "normalize": False},
    ],
)
def test_grouped_ties_equals_one_by_one(group_size: int, mixed: bool, params: dict[str, Any]) -> None:
    deltas = _deltas(6, mixed=mixed)
    ref = _run(TiesOneByOne, deltas, group_size, **params)
    got = _run(Ties, deltas, group_size, **params)
    assert any(bool(v.abs().sum() > 0) for v in ref.values())
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_grouped_dare_ties_equals_one_by_one() -> None:
    deltas = _deltas(5)
    ref = _run(DareTiesOneByOne, deltas, 4, density=0.5)
    got = _run(DareTies, deltas, 4, density=0.5)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_grouped_ties_single_client_and_current() -> None:
    deltas = _deltas(4)
    agg = create("ties", density=1.0, group_size=8)
    agg.begin(SHAPES)
    agg.add(deltas[0], weight=1.0)  # as client 0 in _run
    assert len(agg._pending_sparse) == 1  # held until the group fills or the merge is read
    first = agg.current()
    assert not agg._pending_sparse
    only = _run(TiesOneByOne, deltas[:1], 8, density=1.0)
    for key in only:
        assert torch.equal(first[key], only[key])
    for d in deltas[1:]:
        agg.add(d, weight=2.0)
    state = agg.accumulator_state()
    assert not agg._pending_sparse and set(state) == set(SHAPES)


def test_begin_drops_a_pending_sparse_group() -> None:
    deltas = _deltas(2)
    agg = create("ties", density=1.0, group_size=8)
    agg.begin(SHAPES)
    agg.add(deltas[0])
    agg.finalize()
    agg.begin(SHAPES)
    agg.add(deltas[1])
    assert len(agg._pending_sparse) == 1
    got = agg.finalize()
    ref = _run(TiesOneByOne, deltas[1:], 8, density=1.0)
    for key in ref:
        assert torch.equal(got[key], ref[key])
