from __future__ import annotations

import pytest
import torch

from fedmerge.delta import apply
from fedmerge.errors import ConfigError
from fedmerge.tasks.local_round import client_generator, local_round
from fedmerge_simulations.tasks import DigitsTask, TinyLMTask


def test_client_generators_differ_by_seed_round_and_client() -> None:
    draws = {
        key: torch.rand(4, generator=client_generator(*key)).tolist()
        for key in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    }
    assert len({tuple(v) for v in draws.values()}) == 4
    assert torch.rand(4, generator=client_generator(0, 1, 0)).tolist() == draws[(0, 1, 0)]


def test_full_round_delta_reproduces_the_trained_model(digits: DigitsTask) -> None:
    base = digits.pretrained_base(0)
    client = digits.client_datasets(5, "iid", seed=0)[1]
    update = local_round(digits, base, client, seed=0, round_=3, epochs=3, lr=0.1, batch_size=16)
    assert set(update.delta) == set(base)
    assert update.adapter is None
    model = digits.build_model(0)
    model.load_state_dict(apply(base, update.delta))
    assert digits.evaluate(model, client.test)["accuracy"] == pytest.approx(update.metrics["test-accuracy"])
    assert update.metrics["test-accuracy"] > update.metrics["base-test-accuracy"]
    assert update.metrics["num-examples"] == len(client.train)


def test_round_is_reproducible_and_depends_on_the_round(digits: DigitsTask) -> None:
    base = digits.pretrained_base(0)
    client = digits.client_datasets(5, "iid", seed=0)[1]
    a = local_round(digits, base, client, seed=0, round_=0, epochs=1, lr=0.1)
    b = local_round(digits, base, client, seed=0, round_=0, epochs=1, lr=0.1)
    c = local_round(digits, base, client, seed=0, round_=1, epochs=1, lr=0.1)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert not all(torch.equal(a.delta[k], c.delta[k]) for k in a.delta)


def test_lora_round_delta_is_the_adapter_product(tiny_lm: TinyLMTask) -> None:
    base = tiny_lm.pretrained_base(0)
    client = tiny_lm.client_datasets(6, "task", seed=0)[2]
    rank, alpha = 4, 8.0
    update = local_round(
        tiny_lm,
        base,
        client,
        seed=0,
        round_=0,
        mode="lora",
        epochs=2,
        lr=5e-3,
        lora_rank=rank,
        lora_alpha=alpha,
    )
    assert update.adapter is not None
    changed = {k for k, v in update.delta.items() if v.abs().max() > 0}
    assert changed and all(k.split(".")[-2] in tiny_lm.lora_targets for k in changed)
    name = "model.layers.0.self_attn.q_proj.weight"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    lora_a, lora_b = update.adapter[f"{prefix}.lora_A.weight"], update.adapter[f"{prefix}.lora_B.weight"]
    expected = (alpha / rank) * lora_b @ lora_a
    torch.testing.assert_close(update.delta[name], expected, atol=1e-6, rtol=1e-4)


def test_unknown_mode_is_a_config_error(digits: DigitsTask) -> None:
    client = digits.client_datasets(5, "iid", seed=0)[0]
    with pytest.raises(ConfigError, match="'full' or 'lora'"):
        local_round(digits, digits.pretrained_base(0), client, seed=0, round_=0, mode="qlora")  # type: ignore[arg-type]


def test_without_test_metrics_the_update_is_the_same_and_only_training_reported(digits: DigitsTask) -> None:
    base = digits.pretrained_base(0)
    client = digits.client_datasets(5, "iid", seed=0)[2]
    measured = local_round(digits, base, client, seed=0, round_=1, epochs=1, lr=0.1)
    trained_only = local_round(digits, base, client, seed=0, round_=1, epochs=1, lr=0.1, test_metrics=False)
    assert all(torch.equal(measured.delta[k], trained_only.delta[k]) for k in measured.delta)
    assert not any("test-" in key for key in trained_only.metrics)
    assert {"test-accuracy", "base-test-accuracy"} <= set(measured.metrics)
    assert trained_only.metrics == {k: v for k, v in measured.metrics.items() if "test-" not in k}
