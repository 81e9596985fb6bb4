"""The permuted-digits stream and the benchmark entry point, on small settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmerge_bench import continual as bench_continual
from fedmerge_simulations.continual_digits import StreamConfig, build_stream, pixel_permutation

SMALL = StreamConfig(
    num_tasks=2, hidden=32, pretrain_epochs=8, finetune_epochs=4, permuted_fraction=0.5, seed=3
)


def test_permutation_moves_only_the_requested_share() -> None:
    perm = pixel_permutation(0.25, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(64))
    assert int((perm != torch.arange(64)).sum()) <= 16


def test_stream_is_deterministic_and_experts_beat_the_base() -> None:
    a, b = build_stream(SMALL), build_stream(SMALL)
    for ea, eb in zip(a.experts, b.experts, strict=True):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    for t in range(SMALL.num_tasks):
        assert a.accuracy_with(a.experts[t], t) > a.accuracy(a.base, t) + 0.05


def test_benchmark_prints_json_last_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_continual, "TIMING_AFTER", (2, 3, 4))
    argv = ["--quick", "--tasks", "3", "--orders", "2", "--layer", "32", "--results", str(tmp_path / "r")]
    assert bench_continual.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("opcm", "continual_task_arithmetic", "continual_ties", "magmax", "running_average"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["merge_time_growth_2_to_32"] > 0
    assert (tmp_path / "r" / "continual_digits.png").stat().st_size > 1000
    record = json.loads((tmp_path / "r" / "continual.json").read_text())
    assert len(record["curves"]["opcm"]) == 2 and len(record["curves"]["opcm"][0]) == 3
