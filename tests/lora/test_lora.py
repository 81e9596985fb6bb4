"""peft adapters round-trip; ΔW = s·B·A matches peft's own merge; the three merge spaces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from fedmerge.aggregators.lora import merge_lora
from fedmerge.delta.lora import (
    LoraError,
    LoraTruncationWarning,
    delta_to_lora,
    factorize,
    load_peft_adapter,
    lora_to_delta,
    save_peft_adapter,
)
from fedmerge.delta.state_dict import task_vector
from fedmerge.errors import IncompatibleDeltasError

Factory = Callable[..., Any]
NAMES = {f"layers.{i}.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_equals_peft_merge(
    tmp_path: Path, make_adapter: Factory, make_base: Factory, rslora: bool
) -> None:
    model = make_adapter(tmp_path, seed=3, rank=4, alpha=6.0, rslora=rslora)
    adapter = load_peft_adapter(tmp_path)
    assert set(adapter.modules) == NAMES and adapter.rank == 4 and adapter.alpha == 6.0
    merged = model.merge_and_unload().state_dict()
    base = make_base().state_dict()
    tv = task_vector(base, merged)
    delta = lora_to_delta(adapter)
    for name in NAMES:
        assert torch.allclose(delta[name], tv[name], atol=1e-6), name
    assert all(float(tv[n].abs().max()) == 0 for n in tv if n not in NAMES)  # biases untouched


def test_save_is_read_back_by_peft(tmp_path: Path, adapter_dir: Path, make_base: Factory) -> None:
    adapter = load_peft_adapter(adapter_dir)
    save_peft_adapter(adapter, tmp_path / "out")
    ours = PeftModel.from_pretrained(make_base(), str(tmp_path / "out"))
    theirs = PeftModel.from_pretrained(make_base(), str(adapter_dir))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    again = load_peft_adapter(tmp_path / "out")
    for name, d in lora_to_delta(adapter).items():
        assert torch.allclose(lora_to_delta(again)[name], d, atol=1e-7)


def test_factorize_is_exact_at_full_rank_and_reports_the_residual() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(20, 3, generator=g) @ torch.randn(3, 16, generator=g)
    a, b, res = factorize(low, 3)
    assert a.shape == (3, 16) and b.shape == (20, 3)
    assert res < 1e-5 and torch.allclose(b @ a, low, atol=1e-4)
    full = torch.randn(20, 16, generator=g)
    a, b, res = factorize(full, 5)
    measured = float((full - b @ a).norm() / full.norm())
    assert res == pytest.approx(measured, rel=1e-4) and 0.3 < res < 1
    s = torch.linalg.svdvals(full)
    assert res == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-4)  # Eckart–Young optimum


def test_delta_to_lora_round_trip(adapter_dir: Path) -> None:
    delta = lora_to_delta(load_peft_adapter(adapter_dir))
    back = delta_to_lora(delta, rank=4, alpha=16.0)
    assert all(r < 1e-5 for r in back.residuals.values())
    for name, d in lora_to_delta(back).items():
        assert torch.allclose(d, delta[name], atol=1e-5)
    truncated = delta_to_lora(delta, rank=2)
    assert all(0 < r < 1 for r in truncated.residuals.values())


def _adapters(tmp_path: Path, make_adapter: Factory, n: int = 3) -> list[Any]:
    out = []
    for i in range(n):
        make_adapter(tmp_path / str(i), seed=10 + i)
        out.append(load_peft_adapter(tmp_path / str(i)))
    return out


def _true_mean(adapters: list[Any], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    deltas = [lora_to_delta(a) for a in adapters]
    return {k: sum(w / total * d[k] for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]}  # type: ignore[misc]


def test_product_and_stack_are_exact_factors_is_not(tmp_path: Path, make_adapter: Factory) -> None:
    adapters = _adapters(tmp_path, make_adapter)
    weights = [1.0, 2.0, 5.0]
    truth = _true_mean(adapters, weights)
    errors = {}
    for space, kwargs in [("product", {"rank": 12}), ("stack", {}), ("factors", {})]:
        merged = merge_lora(adapters, weights, space=space, **kwargs)  # type: ignore[arg-type]
        got = lora_to_delta(merged)
        errors[space] = max(float((got[k] - truth[k]).norm() / truth[k].norm()) for k in truth)
    assert errors["product"] < 1e-4 and errors["stack"] < 1e-5
    assert errors["factors"] > 0.1  # mean(B)·mean(A) ≠ mean(B·A)
    stacked = merge_lora(adapters, weights, space="stack")
    assert stacked.rank == 12


def test_product_truncation_reports_residual(tmp_path: Path, make_adapter: Factory) -> None:
    with pytest.warns(LoraTruncationWarning, match="below the exact rank"):
        merged = merge_lora(_adapters(tmp_path, make_adapter), space="product", rank=4)
    assert merged.rank == 4 and all(0 < r < 1 for r in merged.residuals.values())


def test_product_with_a_custom_and_a_registered_aggregator(tmp_path: Path, make_adapter: Factory) -> None:
    adapters = _adapters(tmp_path, make_adapter, n=2)

    def first_only(deltas: Any, weights: Any) -> dict[str, torch.Tensor]:
        return dict(deltas[0])

    got = lora_to_delta(merge_lora(adapters, space="product", aggregator=first_only, rank=8))
    for k, d in lora_to_delta(adapters[0]).items():
        assert torch.allclose(got[k], d, atol=1e-5)
    pytest.importorskip("fedmerge.aggregators")
    via_registry = lora_to_delta(merge_lora(adapters, [1, 3], space="product", aggregator="fedavg", rank=8))
    truth = _true_mean(adapters, [1, 3])
    for k in truth:
        assert torch.allclose(via_registry[k], truth[k], atol=1e-5)


def test_merging_mismatched_adapters_is_refused(tmp_path: Path, make_adapter: Factory) -> None:
    adapters = _adapters(tmp_path, make_adapter, n=2)
    del adapters[1].modules["layers.0.q_proj.weight"]
    with pytest.raises(IncompatibleDeltasError, match=r"layers\.0\.q_proj\.weight"):
        merge_lora(adapters)
    with pytest.raises(LoraError, match="weights"):
        merge_lora(adapters[:1], [1.0, 2.0])
    with pytest.raises(LoraError, match="aggregator"):
        merge_lora(adapters[:1], space="stack", aggregator="ties")


def test_unreadable_adapter_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(LoraError, match=str(tmp_path)):
        load_peft_adapter(tmp_path)
