"""Smoke test of ``python -m bench merging``: a tiny configuration (1 seed, 6 tasks, short training,
defaults only, no cost part) must run every N-model method on the full and the LoRA experts, print the
summary JSON last and write the plot, with normalised accuracies in a sane range. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmerge_bench import merging, merging_suite

TINY = ["--seeds", "1", "--tasks", "6", "--hidden", "64", "--epochs-scale", "1", "--no-grid",
        "--cost-side", "0"]  # fmt: skip


@pytest.mark.slow
def test_merging_benchmark_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert merging.main([*TINY, "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chosen, skipped = merging.methods()
    assert {"fedavg", "task_arithmetic", "ties", "iso_c", "iso_cts", "tsv_m"} <= set(chosen)
    assert "slerp" in skipped and "krum" in skipped
    for name in chosen:
        value = summary[name]
        assert value is not None, f"{name} failed"
        assert 0.05 <= value <= 1.5, f"{name}: normalised accuracy {value}"
    assert summary["best_method"] in chosen
    for key in ("iso_c_minus_ties", "ties_minus_task_arithmetic", "task_arithmetic_minus_average"):
        assert isinstance(summary[key], float) and abs(summary[key]) <= 1.5
    assert summary["tasks"] == 6 and summary["seeds"] == 1
    assert 0.3 <= summary["expert_accuracy"] <= 1.0  # the experts learned their tasks
    assert (tmp_path / "merging.png").stat().st_size > 1000
    record = json.loads((tmp_path / "merging.json").read_text())
    assert len(record["tasks"]) == 6 and not record["errors"]
    # the LoRA experts (peft, product space) are merged by every method too
    assert 0.3 <= summary["lora_expert_accuracy"] <= 1.0
    assert set(summary["lora"]) == set(chosen) | set(merging.LORA_SPACE) and not record["lora"]["errors"]
    for name in [*chosen, *merging.LORA_SPACE]:  # KnOTS and Core Space merge the adapters' factors
        assert 0.05 <= summary["lora"][name] <= 1.5, f"{name} on LoRA experts: {summary['lora'][name]}"


def test_lora_experts_are_low_rank_product_space_deltas() -> None:
    cfg = merging.Config(tasks=2, hidden=32, pretrain_epochs=1, finetune_epochs=1)
    suite = merging.build_suite(cfg, seed=0)
    assert len(suite.lora_experts) == 2
    for lora, factors in zip(suite.lora_experts, suite.lora_factors, strict=True):
        for name, (a, sb) in factors.items():  # the factors are the product's (A, (α/r)·B)
            torch.testing.assert_close(sb @ a, lora[name])
    for lora, full in zip(suite.lora_experts, suite.experts, strict=True):
        assert lora.keys() == full.keys()
        for name, t in lora.items():
            if name.endswith("bias"):
                assert not t.any()  # LoRA trains no bias
            else:
                rank = int(torch.linalg.matrix_rank(t))
                assert 1 <= rank <= cfg.lora_rank, (name, rank)


def test_methods_skip_two_model_and_robust_aggregators() -> None:
    chosen, skipped = merging.methods()
    assert not set(chosen) & merging.ROBUST
    assert set(chosen).isdisjoint(skipped)


def test_diagonal_fisher_matches_a_per_example_loop() -> None:
    g = torch.Generator().manual_seed(0)
    body = merging_suite.build_body(8, g)
    head = merging_suite.linear(8, 3, g)
    head.requires_grad_(False)
    x = torch.rand(20, 64, generator=g)
    params = {k: v.detach().clone() for k, v in body.state_dict().items()}
    got = merging_suite.diagonal_fisher(body, head, params, x, torch.Generator().manual_seed(5))
    with torch.no_grad():
        probs = torch.softmax(head(body(x)), 1)
    y_hat = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        body.zero_grad()
        torch.log_softmax(head(body(x[i : i + 1])), 1)[0, y_hat[i]].backward()
        for name, p in body.named_parameters():
            assert p.grad is not None
            want[name] += p.grad.square() / len(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-8)
    assert "fisher" in merging.methods()[0]  # the benchmark merges with the experts' Fishers


def test_published_order_needs_every_rank_strictly_above_the_next() -> None:
    score = {"iso_c": 0.6, "tsv_m": 0.65, "ties": 0.52, "task_arithmetic": 0.5, "fedavg": 0.49}
    assert merging.published_order(score) is True
    assert merging.published_order({**score, "iso_c": 0.51}) is False  # Iso-C below TIES
    assert merging.published_order({**score, "fedavg": 0.5}) is False  # a tie is not an order
    assert merging.published_order({k: v for k, v in score.items() if k != "ties"}) is None


def test_broad_pretraining_sees_every_view_of_a_fraction_of_the_images() -> None:
    cfg = merging_suite.Config(tasks=3, pretrain_fraction=0.25)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    perms = [torch.randperm(64, generator=g) for _ in range(3)]
    xp, yp = merging_suite.pretraining_data(cfg, x, y, perms)
    assert xp.shape == (4 * 10, 64) and torch.equal(yp, y[:10].repeat(4))  # as they are + 3 views
    assert torch.equal(xp[:10], x[:10])
    for t, spec in enumerate(merging_suite.TASKS[:3]):
        assert torch.equal(xp[10 * (t + 1) : 10 * (t + 2)], spec.transform(x[:10], perms[t]))
    upright = merging_suite.pretraining_data(merging_suite.UPRIGHT, x, y, perms)
    assert upright[0] is x and upright[1] is y
