from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.errors import ConfigError
from fedmerge.tasks.base import ClientData, Split
from fedmerge_simulations.tasks import DigitsTask, Task, TinyLMTask, get_task, register_task, task_names
from fedmerge_simulations.tasks.tiny_lm import CLIENT_TASKS, make_sequences


def fresh_model(task: Task, seed: int = 0) -> torch.nn.Module:
    model = task.build_model(seed)
    model.load_state_dict(task.pretrained_base(seed))
    return model


# ----- registry -----------------------------------------------------------------------------------------
def test_registry_returns_shared_instances_and_rejects_unknown_names() -> None:
    assert {"digits", "tiny_lm"} <= set(task_names())
    assert get_task("digits") is get_task("digits")
    assert isinstance(get_task("tiny_lm"), Task)
    configured = get_task("digits", pretrain_epochs=1)
    assert isinstance(configured, DigitsTask) and configured.pretrain_epochs == 1
    with pytest.raises(ConfigError, match="unknown task 'mnist'"):
        get_task("mnist")
    with pytest.raises(ConfigError, match="does not accept options"):
        get_task("digits", layers=3)
    with pytest.raises(ConfigError, match="already registered"):
        register_task("digits", DigitsTask)


# ----- determinism --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits", "tiny_lm"])
def test_build_model_is_seeded_and_leaves_global_rng_alone(name: str) -> None:
    task = get_task(name)
    state = torch.get_rng_state()
    a, b, c = task.build_model(1), task.build_model(1), task.build_model(2)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_pretrained_base_is_cached_and_returned_as_a_copy(digits: DigitsTask) -> None:
    first = digits.pretrained_base(0)
    first["fc1.weight"].zero_()
    again = digits.pretrained_base(0)
    assert again["fc1.weight"].abs().sum() > 0
    rebuilt = DigitsTask().pretrained_base(0)  # a new instance recomputes: same result
    assert all(torch.equal(again[k], rebuilt[k]) for k in again)


# ----- digits -------------------------------------------------------------------------------------------
def test_digits_splits_are_disjoint_and_clients_cover_the_pool(digits: DigitsTask) -> None:
    clients = digits.client_datasets(20, "dirichlet", seed=0, alpha=0.1, min_partition_size=10)
    pool = digits.client_groups().size
    assert sum(len(c.train) + len(c.test) for c in clients) == pool
    sizes = (len(digits.global_test_set()), len(digits.pretraining_set()), pool)
    assert sum(sizes) == 1797
    # Rows are unique images in this data set, so disjoint rows mean disjoint samples.
    rows = torch.cat([digits.global_test_set().x, digits.pretraining_set().x] + [c.train.x for c in clients])
    rows = torch.cat([rows] + [c.test.x for c in clients])
    assert (
        torch.unique(rows, dim=0).shape[0]
        == torch.unique(
            torch.cat([digits.global_test_set().x, digits.pretraining_set().x, digits._client_pool().x]),
            dim=0,
        ).shape[0]
    )
    assert all(len(c.test) >= 1 and len(c.train) >= 1 for c in clients)
    with pytest.raises(ConfigError, match="no samples"):
        digits.client_datasets(20, "dirichlet", seed=0, alpha=0.01, min_partition_size=0)
    again = digits.client_datasets(20, "dirichlet", seed=0, alpha=0.1, min_partition_size=10)
    assert all(torch.equal(a.train.x, b.train.x) for a, b in zip(clients, again, strict=True))


def test_digits_base_is_better_than_chance_but_leaves_room(digits: DigitsTask) -> None:
    acc = digits.evaluate(fresh_model(digits), digits.global_test_set())["accuracy"]
    assert 0.3 < acc < 0.9


def test_digits_fine_tuning_improves_the_clients_accuracy(digits: DigitsTask) -> None:
    client = digits.client_datasets(5, "iid", seed=0)[0]
    model = fresh_model(digits)
    before = digits.evaluate(model, client.test)["accuracy"]
    metrics = digits.train(
        model, client, epochs=20, lr=0.1, batch_size=16, generator=torch.Generator().manual_seed(0)
    )
    after = digits.evaluate(model, client.test)["accuracy"]
    assert metrics["num-examples"] == len(client.train)
    assert np.isfinite(metrics["train-loss"])
    assert after > before + 0.1


def test_training_rejects_bad_settings(digits: DigitsTask) -> None:
    client = digits.client_datasets(5, "iid", seed=0)[0]
    with pytest.raises(ConfigError, match="unknown local optimizer 'rmsprop'"):
        DigitsTask(local_optimizer="rmsprop").train(  # type: ignore[arg-type]
            fresh_model(digits), client, epochs=1, lr=0.1, batch_size=8, generator=torch.Generator()
        )
    with pytest.raises(ConfigError, match="lr > 0"):
        digits.train(fresh_model(digits), client, epochs=1, lr=0.0, batch_size=8, generator=torch.Generator())
    empty = ClientData(9, client.train.subset(np.array([], dtype=np.int64)), client.test)
    with pytest.raises(ConfigError, match="empty split"):
        digits.train(fresh_model(digits), empty, epochs=1, lr=1e-3, batch_size=8, generator=torch.Generator())
    with pytest.raises(ConfigError, match="disagree in length"):
        Split(client.train.x, client.train.y[:-1], client.train.groups)


# ----- tiny_lm ------------------------------------------------------------------------------------------
def test_sequences_score_only_the_answer() -> None:
    # [BOS, TASK, a1..a4, SEP, b1..b4, EOS]: 12 tokens, inputs and targets are 11 long.
    x, y = make_sequences("reverse", 3, 4, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 11)
    assert (y != -100).nonzero()[:, 1].unique().tolist() == [6, 7, 8, 9]
    # The answer is the reversed input: input values at positions 2..5, answer targets at 6..9.
    assert torch.equal(y[:, 6:10], x[:, 2:6].flip(1))


def test_tiny_lm_base_knows_pretraining_tasks_not_client_tasks(tiny_lm: TinyLMTask) -> None:
    model = fresh_model(tiny_lm)
    pre = tiny_lm.pretraining_set()
    pre_acc = tiny_lm.evaluate(model, pre.subset(np.arange(0, len(pre), 10)))["accuracy"]
    client_acc = tiny_lm.evaluate(model, tiny_lm.global_test_set())["accuracy"]
    # ~0.89–0.92 across transformers/torch releases (the pretraining budget is small); chance is ~0.1
    assert pre_acc > 0.85
    assert client_acc < 0.3


def test_tiny_lm_task_per_client_lora_fine_tuning_improves_each_client(tiny_lm: TinyLMTask) -> None:
    clients = tiny_lm.client_datasets(len(CLIENT_TASKS), "task", seed=0)
    base = fresh_model(tiny_lm)
    chosen = [c for c in clients if CLIENT_TASKS[int(c.train.groups[0])] in ("rotate", "add_two")]
    assert len(chosen) == 2
    for client in chosen:
        assert client.train.groups.unique().numel() == 1
        before = tiny_lm.evaluate(base, client.test)["accuracy"]
        peft_model, metrics = tiny_lm.train_lora(
            base, client, rank=8, alpha=16, epochs=15, lr=5e-3, batch_size=32,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        after = tiny_lm.evaluate(peft_model, client.test)["accuracy"]
        assert after > before + 0.3, CLIENT_TASKS[int(client.train.groups[0])]
        assert metrics["num-examples"] == len(client.train)


@pytest.mark.parametrize("name", ["digits", "tiny_lm"])
def test_lora_training_changes_only_adapter_weights(name: str) -> None:
    task = get_task(name)
    base = fresh_model(task)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    client = task.client_datasets(6, "iid", seed=0)[0]
    peft_model, _ = task.train_lora(
        base,
        client,
        rank=4,
        alpha=8,
        epochs=1,
        lr=1e-2,
        batch_size=32,
        generator=torch.Generator().manual_seed(0),
    )
    adapters: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    for key, value in peft_model.state_dict().items():
        (adapters if "lora_" in key else frozen)[key] = value
    assert adapters and all(("lora_A" in k) or ("lora_B" in k) for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B moved off zero
    for key, value in frozen.items():
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, original[plain]), key
    # The caller's model is left untouched.
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    targets = {k.split(".lora_")[0].split(".")[-1] for k in adapters}
    assert targets == set(task.lora_targets)


def test_tiny_lm_disk_cache_round_trips(tmp_path: Path, tiny_lm: TinyLMTask) -> None:
    first = TinyLMTask(cache_dir=tmp_path).pretrained_base(0)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    class NoPretraining(TinyLMTask):
        def _pretrain(self, model: torch.nn.Module, generator: torch.Generator) -> None:
            raise AssertionError("the base should have come from the disk cache")

    loaded = NoPretraining(cache_dir=tmp_path).pretrained_base(0)
    in_process = tiny_lm.pretrained_base(0)
    assert all(torch.equal(first[k], loaded[k]) and torch.equal(first[k], in_process[k]) for k in first)
