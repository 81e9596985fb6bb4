"""Shared fixtures: the built-in tasks (one instance per session, so each base is pre-trained once)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedmerge_simulations.tasks import DigitsTask, TinyLMTask, get_task


@pytest.fixture(scope="session")
def digits() -> DigitsTask:
    task = get_task("digits")
    assert isinstance(task, DigitsTask)
    return task


@pytest.fixture(scope="session")
def tiny_lm() -> TinyLMTask:
    task = get_task("tiny_lm")
    assert isinstance(task, TinyLMTask)
    return task


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is fastest and immune to other processes' load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
