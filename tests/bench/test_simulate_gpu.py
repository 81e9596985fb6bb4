"""``python -m bench simulate --gpu-fraction F``: both sides' virtual clients train on F of one GPU.

Without a GPU the option is refused in one line before anything starts; with one (skipped elsewhere),
a small federation of each side runs with its clients on the GPU. No timing is asserted."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from fedmerge_bench import simulate
from fedmerge_bench.rounds import child
from fedmerge_testing.progress import run_watched

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fraction", [-0.5, 1.5, math.nan])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    problem = simulate.gpu_problem(fraction)
    assert problem is not None and "(0, 1]" in problem


def test_the_cpu_needs_no_gpu() -> None:
    assert simulate.gpu_problem(0.0) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_cli_says_so_in_one_line() -> None:
    proc = run_watched(  # ended only if it stops making progress (a busy machine imports slowly)
        [sys.executable, "-m", "bench", "simulate", "--quick", "--gpu-fraction", "0.1"],
        cwd=ROOT, env=dict(os.environ), idle_s=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["fedmerge", "flower"])
def test_both_sides_train_their_clients_on_gpu_fractions(kind: str) -> None:
    options = {"gpu_fraction": 0.25, **({"codec": simulate.CODEC} if kind == "fedmerge" else {})}
    result = child(kind, 4, 2, options=options)
    assert len(result["round_s"]) == 2
    assert 0.2 < result["accuracy"][-1] <= 1.0  # ten classes: above chance after two rounds
