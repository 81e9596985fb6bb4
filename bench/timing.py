"""Timing that survives a shared, noisy machine: interleaved best-of-k, load average, bounded ratios.

Every benchmark compares a fedmerge operation with a reference measured in the same run. On a
machine shared with other jobs a single timing of either side can be slowed by any factor, never
sped up, so:

* :func:`interleaved` runs the two callables alternately (ours, ref, ours, ref, … after one untimed
  warm-up call of each) and keeps the **minimum** of k timings per side. Interleaving exposes both
  sides to the same load phases; the minimum is the run least disturbed by other jobs (noise only
  ever adds time), so min/min ratios are far more stable than means or medians.
* :func:`load_average` reads ``/proc/loadavg`` (with the number of CPUs) so each benchmark prints
  how loaded the machine was.
* :func:`fraction_of_bandwidth` turns times into a fraction of memory read bandwidth that **cannot
  exceed 1.0 by construction**. The reference pass reads exactly the bytes the method reads and does
  strictly less work with them (e.g. a sum over the same client tensors), so it is a lower bound on the
  time any method needs to read those bytes. The method's own run is itself a pass that reads all of
  them; hence the fastest observed read of those bytes is
  ``t_read = min(min_k t_reference, min_k t_method)`` and the reported fraction is
  ``t_read / min_k t_method`` ≤ 1. When noise makes the reference look slower than the method
  (the "100 % of bandwidth under load" artefact), the fraction saturates at 1.0 instead of passing
  it, and :attr:`Fraction.reference_was_slower` says so — a sign the run was too noisy to trust.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pair:
    """Best-of-k times (seconds) of a method and its reference, measured interleaved."""

    ours_s: float
    ref_s: float
    ours_all: list[float] = field(default_factory=list)
    ref_all: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """ref_s / ours_s: how many times faster the method is than its reference (> 1 = faster)."""
        return self.ref_s / self.ours_s


@dataclass(frozen=True)
class Fraction:
    """A method's share of the measured read bandwidth (see the module docstring)."""

    value: float
    read_s: float
    method_s: float
    reference_was_slower: bool


def _timed(fn: Callable[[], object], sync: Callable[[], None] | None) -> float:
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def best_of(fn: Callable[[], object], k: int, *, sync: Callable[[], None] | None = None,
            warmup: bool = True) -> float:  # fmt: skip
    """Minimum wall time of ``k`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if warmup:
        fn()
    return min(_timed(fn, sync) for _ in range(k))


def interleaved(
    ours: Callable[[], object],
    ref: Callable[[], object],
    k: int,
    *,
    sync: Callable[[], None] | None = None,
    warmup: bool = True,
) -> Pair:
    """Time ``ours`` and ``ref`` alternately ``k`` times each; keep the minimum of each side.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after every timed call so
    asynchronous devices are timed to completion. The order alternates per repeat (ours first on
    even repeats, ref first on odd ones) so neither side always runs right after the other's
    cache-warming or cache-trashing pass.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if warmup:
        ours()
        ref()
    a: list[float] = []
    b: list[float] = []
    for i in range(k):
        if i % 2 == 0:
            a.append(_timed(ours, sync))
            b.append(_timed(ref, sync))
        else:
            b.append(_timed(ref, sync))
            a.append(_timed(ours, sync))
    return Pair(min(a), min(b), a, b)


def fraction_of_bandwidth(method_s: float, reference_read_s: float) -> Fraction:
    """``min(t_ref, t_method) / t_method`` ∈ (0, 1]: the method's share of the fastest observed read.

    ``reference_read_s`` must time a pass that reads the same bytes as the method and does a strict
    subset of its work (both best-of-k, measured interleaved). Since the method's run also read every
    byte, the fastest observed read is the smaller of the two times, so the result is ≤ 1 whatever the
    noise; ``reference_was_slower`` flags runs where it saturated.
    """
    if method_s <= 0 or reference_read_s <= 0:
        raise ValueError(f"times must be positive, got method {method_s} s, reference {reference_read_s} s")
    read_s = min(method_s, reference_read_s)
    return Fraction(read_s / method_s, read_s, method_s, reference_read_s > method_s)


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (``os.getloadavg``; NaN where unavailable)."""
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - platforms without a load average
        nan = float("nan")
        return nan, nan, nan


def load_line() -> str:
    """One line for a benchmark's output: load averages and the number of CPUs."""
    one, five, fifteen = load_average()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
