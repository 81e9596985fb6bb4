"""The runtime every fused kernel shares: numba when it is installed (a declared dependency), each
``prange`` fold compiled twice (:class:`SizedKernel`: parallel above :data:`PARALLEL_MIN_ELEMENTS`
coordinates, serial below), the switch to the plain torch expressions (:func:`torch_path`, the path
CUDA tensors always take), and the flat fp32 buffers and numpy views the kernels work on.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

try:  # numba is a declared dependency; the torch path keeps GPUs (and odd platforms) working
    from numba import njit, prange, typed

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False
    njit = prange = typed = None  # type: ignore[assignment,misc]

BLOCK = 4096  # coordinates per block: 5 fp32 accumulators × 16 KiB stay in L1/L2 while G inputs stream
# Coordinates per block of the grouped sparse fold: 5 fp32 accumulators × 64 KiB stay in L2 while the
# group's non-zeros in that range (a few thousand per client at density 0.1) stream through.
SPARSE_BLOCK = 1 << 14
VOTE_TOTAL = 0
VOTE_FREQUENCY = 1
# Below this many coordinates a fold runs on the calling thread. Waking a thread team costs more
# than ~10^5 element updates, and on a busy machine (a simulation's clients on every core) OpenMP's
# spinning barriers make a parallel fold of a small tensor 100–1000× slower than a serial one.
PARALLEL_MIN_ELEMENTS = 1 << 17


class SizedKernel:
    """A numba kernel compiled twice from one function: parallel (``prange`` splits the loop over
    threads) and serial (``prange`` acts as ``range``). ``kernel.on(n)`` picks by problem size."""

    def __init__(self, fn: Callable[..., Any], fastmath: bool) -> None:
        flags: Any = set(RESULT_PRESERVING_FASTMATH) if fastmath else False
        self.parallel = njit(parallel=True, cache=True, fastmath=flags)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
        twin.__qualname__ = fn.__qualname__ + "_serial"  # its own on-disk cache entry
        self.serial = njit(cache=True, fastmath=flags)(twin)

    def on(self, n: int) -> Callable[..., Any]:
        return self.parallel if n >= PARALLEL_MIN_ELEMENTS else self.serial


# The only fast-math flags the folds use: they let LLVM drop NaN/inf/signed-zero bookkeeping (inputs are
# validated finite) but never reassociate, contract into FMAs or replace a division by a reciprocal,
# so every kernel returns the bit-exact result of its plain torch twin on every LLVM release.
RESULT_PRESERVING_FASTMATH = frozenset({"nnan", "ninf", "nsz"})


def sized_kernel(fastmath: bool = False) -> Callable[[Callable[..., Any]], SizedKernel]:
    """Decorator: compile a ``prange`` loop as a :class:`SizedKernel` (``fastmath=True`` means
    :data:`RESULT_PRESERVING_FASTMATH`, never LLVM's full ``fast`` set)."""
    return lambda fn: SizedKernel(fn, fastmath)


def zeros(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 zero tensor. On the CPU it comes from numpy, which backs large arrays with
    transparent huge pages (5× faster first touch than torch's 4 KiB pages) and callocs them, so
    pages are faulted in by the parallel kernels that first touch them."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(numel, dtype=np.float32))
    return torch.zeros(numel, dtype=torch.float32, device=device)


def empty(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 uninitialised tensor, huge-page backed on the CPU (see :func:`zeros`)."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(numel, dtype=np.float32))
    return torch.empty(numel, dtype=torch.float32, device=device)


_FORCE_TORCH = False


@contextmanager
def torch_path() -> Iterator[None]:
    """Within this block every fold runs its plain torch expressions even on CPU fp32 tensors — the
    code path CUDA tensors (and machines without numba) always take — so the device-generic path
    is testable on a CPU. Not thread-safe: meant for tests and benchmarks."""
    global _FORCE_TORCH
    previous, _FORCE_TORCH = _FORCE_TORCH, True
    try:
        yield
    finally:
        _FORCE_TORCH = previous


def use_numba(*tensors: torch.Tensor) -> bool:
    """Whether a fold over these tensors runs its numba kernel: numba is there, :func:`torch_path` is
    not active, and every tensor is a CPU fp32 one."""
    return numba_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def numba_enabled() -> bool:
    """numba is installed and :func:`torch_path` is not active."""
    return HAVE_NUMBA and not _FORCE_TORCH


def np_view(t: torch.Tensor) -> np.ndarray:
    """The flat numpy view of a CPU tensor (no copy)."""
    return t.detach().reshape(-1).numpy()


def flat32(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Flat, contiguous fp32 view (a copy only when dtype, device or layout require it)."""
    return x.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def as_f32(values: Sequence[float]) -> np.ndarray:
    """Per-client scalars as the fp32 array a kernel takes."""
    return np.asarray(values, dtype=np.float32)


__all__ = [
    "BLOCK",
    "HAVE_NUMBA",
    "PARALLEL_MIN_ELEMENTS",
    "RESULT_PRESERVING_FASTMATH",
    "SPARSE_BLOCK",
    "VOTE_FREQUENCY",
    "VOTE_TOTAL",
    "SizedKernel",
    "as_f32",
    "empty",
    "flat32",
    "njit",
    "np_view",
    "numba_enabled",
    "prange",
    "sized_kernel",
    "torch_path",
    "typed",
    "use_numba",
    "zeros",
]
