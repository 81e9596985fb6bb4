"""A local round on a model the process built before computes what it computes on a fresh one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fedmerge.delta import apply
from fedmerge.delta.state_dict import StateDict
from fedmerge.tasks import model_pool
from fedmerge.tasks.base import ClientData
from fedmerge.tasks.local_round import LocalUpdate, local_round
from fedmerge.tasks.model_pool import borrowed_model, forget_models, idle_models, reuses_models
from fedmerge_simulations.tasks import DigitsTask, TinyLMTask


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    forget_models()
    yield
    forget_models()


def _fresh_round(
    task: DigitsTask | TinyLMTask, base: StateDict, client: ClientData, **kw: Any
) -> LocalUpdate:
    forget_models()  # a process that never ran a round: the model is built afresh
    return local_round(task, base, client, **kw)


@pytest.mark.parametrize("task_name", ["digits", "tiny_lm"])
def test_rounds_on_a_reused_model_are_bit_identical_to_fresh_ones(
    task_name: str, digits: DigitsTask, tiny_lm: TinyLMTask
) -> None:
    task = digits if task_name == "digits" else tiny_lm
    base = task.pretrained_base(0)
    clients = task.client_datasets(4, "iid", seed=0)
    kw: dict[str, Any] = {"seed": 0, "epochs": 1, "lr": 0.05, "batch_size": 16}
    # a chain of rounds in one process: other clients, other bases, the model reused each time
    forget_models()
    reused = []
    state = base
    for round_, client in enumerate(clients[:3]):
        update = local_round(task, state, client, round_=round_, **kw)
        reused.append((state, client, round_, update))
        state = apply(state, update.delta)
    assert idle_models(task, 0) == 1, "full CPU rounds leave their model to the next one"
    for start, client, round_, update in reused:
        fresh = _fresh_round(task, start, client, round_=round_, **kw)
        assert update.delta.keys() == fresh.delta.keys()
        assert all(torch.equal(update.delta[k], fresh.delta[k]) for k in fresh.delta)
        assert update.metrics == fresh.metrics


def test_a_borrowed_model_comes_back_as_build_model_gives_it(digits: DigitsTask) -> None:
    with borrowed_model(digits, 0) as model:
        first = model
        model.eval()  # what a round may leave behind: eval mode, frozen weights, gradients
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = torch.ones_like(p)
    with borrowed_model(digits, 0) as again:
        assert again is first
        assert all(m.training for m in again.modules())
        assert all(p.requires_grad and p.grad is None for p in again.parameters())
        with borrowed_model(digits, 0) as concurrent:  # lent to one caller at a time
            assert concurrent is not again
    with borrowed_model(digits, 1) as other_seed:
        assert other_seed is not first


def test_models_are_not_reused_when_the_round_says_not_or_it_failed(digits: DigitsTask) -> None:
    with borrowed_model(digits, 0, reuse=False) as model:
        pass
    with borrowed_model(digits, 0) as again:
        assert again is not model
    with pytest.raises(RuntimeError), borrowed_model(digits, 0) as failed:
        raise RuntimeError("training failed half-way")
    with borrowed_model(digits, 0) as after:
        assert after is not failed


def test_lora_rounds_build_their_model_afresh(tiny_lm: TinyLMTask) -> None:
    base = tiny_lm.pretrained_base(0)
    client = tiny_lm.client_datasets(2, "iid", seed=0)[0]
    kw: dict[str, Any] = {"seed": 0, "round_": 0, "mode": "lora", "epochs": 1, "lr": 0.05, "batch_size": 16}
    a = local_round(tiny_lm, base, client, **kw)
    assert idle_models(tiny_lm, 0) == 0
    b = local_round(tiny_lm, base, client, **kw)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)


def test_large_models_are_not_kept(digits: DigitsTask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_pool, "MAX_MODEL_BYTES", 1024)
    with borrowed_model(digits, 0) as model:
        pass
    with borrowed_model(digits, 0) as again:
        assert again is not model


def test_a_task_that_does_not_say_its_model_is_reusable_builds_it_each_round(digits: DigitsTask) -> None:
    from types import SimpleNamespace

    # a task of its own: the same methods, no reuse_model attribute (its train might leave hooks)
    plain = SimpleNamespace(build_model=digits.build_model, train=digits.train, evaluate=digits.evaluate)
    assert not reuses_models(plain) and reuses_models(digits)
    base = digits.pretrained_base(0)
    client = digits.client_datasets(4, "iid", seed=0)[0]
    kw: dict[str, Any] = {"seed": 0, "round_": 0, "epochs": 1, "lr": 0.05}
    got = local_round(plain, base, client, **kw)
    assert idle_models(plain, 0) == 0
    want = local_round(digits, base, client, **kw)
    assert all(torch.equal(got.delta[k], want.delta[k]) for k in want.delta)
