"""The device-generic (torch) path of the streaming aggregators: what CUDA tensors run.

``kernels.torch_path()`` makes CPU tensors take the torch expressions CUDA tensors always take, so
the GPU code path is tested on every machine against peft's ``merge_utils`` and plain formulas and
against the numba CPU path. The CUDA-only test runs the same aggregations on the GPU and compares
them with the CPU; it skips cleanly where torch sees no CUDA device."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft.utils import merge_utils

from fedmerge.aggregators import create
from fedmerge.aggregators import kernels as K
from fedmerge.delta import SparseTensor

TOL: dict[str, Any] = dict(atol=1e-6, rtol=1e-5)


def deltas(n: int, p: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(p, generator=g) * (torch.rand(p, generator=g) + 0.1).reciprocal() for _ in range(n)]
    xs[1][::11] = -xs[0][::11]  # sign conflicts with equal magnitudes
    return xs


def merge(name: str, xs: list[Any], ws: list[float], device: torch.device, **params: Any) -> torch.Tensor:
    agg = create(name, device=device, **params)
    agg.begin({"t": tuple(xs[0].shape)})
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        agg.add({"t": x}, w, client_id=i)
    return agg.finalize()["t"].cpu()


CPU = torch.device("cpu")
P = 200_000  # above the sampled-threshold and parallel-fold sizes of the numba path
WS = [1.0, 2.0, 0.5, 3.0, 1.5]


def test_torch_path_is_really_taken() -> None:
    x = torch.ones(8)
    assert K.use_numba(x) == K.HAVE_NUMBA
    with K.torch_path():
        assert not K.use_numba(x)
    assert K.use_numba(x) == K.HAVE_NUMBA


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_ties_torch_path_matches_peft_and_numba(density: float) -> None:
    xs = deltas(5, P, seed=1)
    ref = merge_utils.ties(xs, torch.tensor(WS), density)
    with K.torch_path():
        generic = merge("ties", xs, WS, CPU, density=density)
    torch.testing.assert_close(generic, ref, **TOL)
    torch.testing.assert_close(generic, merge("ties", xs, WS, CPU, density=density), **TOL)


def test_fedavg_torch_path_matches_the_weighted_mean() -> None:
    xs = deltas(5, P, seed=2)
    w = torch.tensor(WS)[:, None]
    ref = (torch.stack(xs) * w).sum(0) / w.sum()
    with K.torch_path():
        generic = merge("fedavg", xs, WS, CPU)
    torch.testing.assert_close(generic, ref, **TOL)
    torch.testing.assert_close(generic, merge("fedavg", xs, WS, CPU), **TOL)


def test_sparse_ties_and_magmax_torch_path_match_dense_references() -> None:
    xs = [merge_utils.magnitude_based_pruning(x, 0.1) for x in deltas(5, P, seed=3)]
    sparse = [SparseTensor.from_dense(x) for x in xs]
    with K.torch_path():
        ties_generic = merge("ties", sparse, WS, CPU, density=1.0)
        magmax_generic = merge("magmax", sparse, WS, CPU)
    torch.testing.assert_close(ties_generic, merge_utils.ties(xs, torch.tensor(WS), 1.0), **TOL)
    torch.testing.assert_close(ties_generic, merge("ties", sparse, WS, CPU, density=1.0), **TOL)
    t = torch.stack(xs)  # equal magnitudes of opposite sign (every 11th entry): the positive value wins
    pick = t.abs().argmax(0, keepdim=True) + 0 * t[:1].long()
    ref = t.gather(0, pick)[0].abs() * torch.where((t == t.abs().amax(0)).any(0), 1.0, -1.0)
    torch.testing.assert_close(magmax_generic, ref, **TOL)
    torch.testing.assert_close(magmax_generic, merge("magmax", sparse, WS, CPU), **TOL)


def test_dare_ties_torch_path_matches_numba() -> None:
    xs = deltas(4, P, seed=4)
    ws = WS[:4]
    with K.torch_path():
        generic = merge("dare_ties", xs, ws, CPU, density=0.5, seed=7)
    torch.testing.assert_close(generic, merge("dare_ties", xs, ws, CPU, density=0.5, seed=7), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to torch")
@pytest.mark.parametrize(("name", "params"), [("fedavg", {}), ("ties", {"density": 0.2}),
                                              ("dare_ties", {"density": 0.5, "seed": 7}),
                                              ("magmax", {})])  # fmt: skip
def test_cuda_matches_cpu(name: str, params: dict[str, Any]) -> None:
    xs = deltas(5, P, seed=5)
    cuda = torch.device("cuda")
    on_gpu = merge(name, [x.to(cuda) for x in xs], WS, cuda, **params)
    torch.testing.assert_close(on_gpu, merge(name, xs, WS, CPU, **params), **TOL)
    sparse = [SparseTensor.from_dense(merge_utils.magnitude_based_pruning(x, 0.1)) for x in xs]
    if name == "ties":
        gpu_sparse = [SparseTensor(x.indices.to(cuda), x.values.to(cuda), x.shape) for x in sparse]
        torch.testing.assert_close(
            merge(name, gpu_sparse, WS, cuda, density=1.0), merge(name, sparse, WS, CPU, density=1.0), **TOL
        )
