"""Fisher-weighted averaging as a federated method: each client sends its diagonal Fisher beside its
delta (a second package), the round engine judges it like a delta and the ``fisher`` aggregator
merges Σ w(F+floor)τ / Σ w(F+floor). Real Flower messages, a real store, the client's own encoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from torch import nn

from fedmerge.codec import CodecConfig, PackageMeta, decode_package
from fedmerge.delta.fisher import diagonal_fisher
from fedmerge.errors import ConfigError
from fedmerge.flower.client.reply import FISHER_CODEC, encode_reply
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.federation import fedmerge_config
from fedmerge.flower.transport import FISHER_RECORD_KEY, record_to_package
from fedmerge.store import ModelStore
from fedmerge_testing.hostile import FlowerRound, train_message

LOSSLESS = CodecConfig(sparsify="none", values="fp32", error_feedback=False)
FLOOR = 1e-6


def test_the_empirical_fisher_of_a_linear_model_is_the_mean_squared_per_example_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=g))
        model.bias.copy_(torch.randn(2, generator=g))
    model.register_buffer("steps", torch.zeros(4))  # a floating buffer: no gradient, F = 0

    def loss(m: nn.Module, i: int) -> torch.Tensor:
        return 0.5 * (m(x[i]) - t[i]).square().sum()

    got = diagonal_fisher(model, loss, [0, 2, 3, 6], ["weight", "bias", "steps"])
    with torch.no_grad():
        r = model(x) - t  # ∂ℓ_i/∂W = r_i x_iᵀ, ∂ℓ_i/∂b = r_i
    rows = [0, 2, 3, 6]
    expected_w = torch.stack([torch.outer(r[i], x[i]).square() for i in rows]).mean(0)
    expected_b = torch.stack([r[i].square() for i in rows]).mean(0)
    torch.testing.assert_close(got["weight"], expected_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["bias"], expected_b, rtol=1e-5, atol=1e-7)
    assert torch.equal(got["steps"], torch.zeros(4))
    assert model.weight.grad is None  # gradients are cleared afterwards
    with pytest.raises(ConfigError, match="at least one example"):
        diagonal_fisher(model, loss, [], ["weight"])


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _reply(
    fr: FlowerRound, node: int, delta: dict[str, torch.Tensor], n: int, fisher: dict[str, torch.Tensor] | None
) -> Message:
    meta = PackageMeta(
        client_id=f"inst-{node}", round=1, base_version_id=fr.base.id,
        base_version_hash=fr.base.content_hash, num_examples=n,
    )  # fmt: skip
    content, _ = encode_reply(delta, LOSSLESS, meta, _context(), {}, fisher)
    return Message(content, reply_to=train_message(node))


@pytest.fixture
def fr(tmp_path: Path) -> FlowerRound:
    return FlowerRound.open(tmp_path / "store", aggregator="fisher", **{"codec-density": 1.0})


def _random(fr: FlowerRound, seed: int, positive: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(v.shape, generator=g) for k, v in fr.weights.items() if v.is_floating_point()}
    return {k: v.abs() * 1e-3 for k, v in out.items()} if positive else out


def test_a_round_merges_each_delta_with_the_fisher_its_client_sent(fr: FlowerRound) -> None:
    state = fr.state()
    sent = [(_random(fr, i), 10 * (i + 1), _random(fr, 100 + i, positive=True)) for i in range(3)]
    for node, (delta, n, fisher) in enumerate(sent):
        outcome = state.judge(node, _reply(fr, node, delta, n, fisher))
        assert outcome.accepted, outcome.reason
    merged = state.aggregator.finalize()
    for key in merged:
        # the Fisher travels in bf16: the reference uses what arrived
        num = sum(n * (f[key].to(torch.bfloat16).float() + FLOOR) * d[key] for d, n, f in sent)
        den = sum(n * (f[key].to(torch.bfloat16).float() + FLOOR) for _, n, f in sent)
        torch.testing.assert_close(merged[key], num / den, rtol=1e-5, atol=1e-7)
    plain_mean = {k: sum(n * d[k] for d, n, _ in sent) / 60 for k in merged}
    assert any(not torch.allclose(merged[k], plain_mean[k], atol=1e-4) for k in merged)


def test_the_fisher_package_is_dense_bf16_named_after_the_delta() -> None:
    fisher = {"w": torch.tensor([1e-12, 3.0, 0.0])}  # bf16 keeps fp32's range: 1e-12 is not flushed
    meta = PackageMeta(client_id="c", round=1, base_version_id="v", base_version_hash="h", num_examples=1)
    content, _ = encode_reply({"w": torch.ones(3)}, LOSSLESS, meta, _context(), {}, fisher)
    pkg = decode_package(record_to_package(content, FISHER_RECORD_KEY))
    assert FISHER_CODEC.values == "bf16"
    assert pkg.tensors["w"][0] > 0 and torch.equal(pkg.tensors["w"][1:], torch.tensor([3.0, 0.0]))


BadFisher = Callable[[FlowerRound, dict[str, torch.Tensor]], Any]


@pytest.mark.parametrize(
    ("name", "fisher", "reason"),
    [
        ("missing", lambda fr, f: None, "merges with each client's diagonal Fisher"),
        ("negative", lambda fr, f: {k: -v - 1 for k, v in f.items()}, "negative or non-finite"),
        ("huge", lambda fr, f: {k: v + 1e37 for k, v in f.items()}, "Fisher of 'inst-1'"),
        ("wrong shape", lambda fr, f: {**f, "fc1.bias": torch.ones(3)}, "fc1.bias"),
    ],
)
def test_a_reply_whose_fisher_is_missing_or_bad_is_a_recorded_rejection(
    fr: FlowerRound, name: str, fisher: BadFisher, reason: str
) -> None:
    state = fr.state()
    honest = state.judge(0, _reply(fr, 0, _random(fr, 0), 5, _random(fr, 10, positive=True)))
    bad = state.judge(1, _reply(fr, 1, _random(fr, 1), 5, fisher(fr, _random(fr, 11, positive=True))))
    assert honest.accepted and not bad.accepted, name
    assert reason in str(bad.reason)
    merged = state.aggregator.finalize()  # the rejected reply left no trace
    for key, value in merged.items():
        torch.testing.assert_close(value, _random(fr, 0)[key])


def test_fisher_rounds_need_full_fine_tuning_without_dp_and_tell_clients_how_many_examples(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"needs\s+mode='full'"):
        parse_run_config({"aggregator": "fisher", "mode": "lora"})
    with pytest.raises(ConfigError, match="neither clipped nor noised"):
        parse_run_config(
            {"aggregator": "fisher", "dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "dp-mode": "local"}
        )
    with pytest.raises(ConfigError, match="fisher-examples=0"):
        parse_run_config({"aggregator": "fisher", "fisher-examples": 0})
    cfg = parse_run_config({"aggregator": "fisher", "fisher-examples": 64})
    with ModelStore.open(tmp_path / "s") as store:
        from fedmerge.flower.server.federation import ensure_base

        base = ensure_base(store, lambda: {"w": torch.zeros(2)}, name="b")
    assert fedmerge_config(cfg, 1, base)["fisher-examples"] == 64
    assert fedmerge_config(parse_run_config({"aggregator": "ties"}), 1, base)["fisher-examples"] == 0


@pytest.mark.slow
def test_a_simulated_fisher_round_trains_estimates_and_merges(
    tmp_path: Path, simulate: Callable[..., Any]
) -> None:
    from fedmerge_clients.app import make_client_app

    store = tmp_path / "store"
    reports = simulate(store, make_client_app(), 3, aggregator="fisher", fisher_examples=32, min_clients=3,
                       min_valid=3, codec_density=1.0)  # fmt: skip
    # a reply without its Fisher is rejected (test above): all three carried one
    assert len(reports) == 1 and len(reports[0].accepted) == 3, [o.reason for o in reports[0].rejected]
    with ModelStore.open(store) as st:
        version = st.get("latest")
        assert version.method == "fisher" and version.round == 1
        accepted = sorted(c.client_id for c in version.contributors if c.accepted)
        assert accepted == ["client-0", "client-1", "client-2"]
