"""Attack simulations: the poisoning primitives, the defences' rejection, a small real run and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmerge.errors import ConfigError
from fedmerge.tasks.base import Split
from fedmerge_simulations.attack_report import markdown_table, summarise, write_report
from fedmerge_simulations.attacks import (
    TARGET_LABEL,
    TRIGGER_PIXELS,
    AttackConfig,
    AttackResult,
    aggregate,
    flip_labels,
    malicious_clients,
    poison,
    run_one,
    stamp_trigger,
)


def _split(n: int = 40) -> Split:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10
    return Split(torch.rand(n, 64, generator=g) * 0.5, y, y)


def test_poison_stamps_the_trigger_and_relabels_exactly_the_fraction() -> None:
    split = _split()
    out = poison(split, 0.5, torch.Generator().manual_seed(1))
    stamped = (out.x[:, list(TRIGGER_PIXELS)] == 1.0).all(dim=1)
    assert int(stamped.sum()) == 20
    assert bool((out.y[stamped] == TARGET_LABEL).all())
    assert torch.equal(out.y[~stamped], split.y[~stamped]) and torch.equal(out.x[~stamped], split.x[~stamped])
    assert not bool((stamp_trigger(split.x) == split.x).all())


def test_label_flip_and_malicious_choice() -> None:
    assert flip_labels(_split(), 10).y.tolist()[:3] == [9, 8, 7]
    cfg = AttackConfig(num_clients=10, malicious_fraction=0.3, seed=4)
    bad = malicious_clients(cfg)
    assert len(bad) == 3 and bad == malicious_clients(cfg) and all(0 <= b < 10 for b in bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"malicious_fraction": 0.5}, "malicious_fraction=0.5"),
        ({"num_clients": 3}, "num_clients=3"),
        ({"attacks": ("poison",)}, "unknown attack 'poison'"),
        ({"defences": ("bulyan",)}, "unknown defence 'bulyan'"),
    ],
)
def test_bad_attack_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AttackConfig(**kwargs)  # type: ignore[arg-type]


def test_rejection_drops_sign_flipped_clients_and_median_resists_a_scaled_one() -> None:
    g = torch.Generator().manual_seed(0)
    honest = {i: {"w": torch.ones(50) + 0.1 * torch.randn(50, generator=g)} for i in range(8)}
    deltas = {**honest, 8: {"w": -honest[0]["w"]}, 9: {"w": -honest[1]["w"]}}
    weights = {i: 1.0 for i in deltas}
    merged, rejected = aggregate("fedavg+reject", deltas, weights, seed=0, round_=1)
    assert rejected == {8, 9}
    assert float(merged["w"].mean()) == pytest.approx(1.0, abs=0.05)
    scaled = {**honest, 8: {"w": honest[0]["w"] * -100}}
    avg, _ = aggregate("fedavg", scaled, {i: 1.0 for i in scaled}, seed=0, round_=1)
    med, _ = aggregate("median", scaled, {i: 1.0 for i in scaled}, seed=0, round_=1)
    assert float(avg["w"].mean()) < -5 and float(med["w"].mean()) == pytest.approx(1.0, abs=0.1)


def test_model_replacement_backdoors_fedavg_but_not_the_median() -> None:
    cfg = AttackConfig(num_clients=10, malicious_fraction=0.2, rounds=3, local_epochs=1)
    fedavg = run_one("scaling", "fedavg", cfg)
    median = run_one("scaling", "median", cfg)
    clean = run_one("none", "fedavg", cfg)
    assert len(fedavg.malicious) == 2 and clean.malicious == []
    assert len(fedavg.accuracy_per_round) == 3
    assert fedavg.backdoor_success > 0.5 > 0.1 > median.backdoor_success
    assert clean.backdoor_success < 0.1 and clean.accuracy > 0.5


def test_report_writes_every_artefact(tmp_path: Path) -> None:
    results = [
        AttackResult(a, d, 0.2, s, acc, bd)
        for s in (0, 1)
        for a, d, acc, bd in [("none", "fedavg", 0.8, 0.0), ("scaling", "fedavg", 0.5, 0.9)]
    ]
    summary = write_report(results, tmp_path, "cmd")
    assert summary[(0.2, "scaling", "fedavg")]["seeds"] == 2.0
    for name in ("results.json", "results.csv", "accuracy.png", "backdoor.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4
    assert "| scaling | 90.0 |" in markdown_table(summarise(results), "backdoor_success")
