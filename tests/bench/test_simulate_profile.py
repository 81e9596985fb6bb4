"""Smoke test of ``python -m bench simulate_profile``: a tiny in-process federation attributes time to
every client phase it ran, and with ``--accuracy`` the dense fp32 codec sends more bytes than the
benchmark's top-20 % int4 codec. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from fedmerge_bench import simulate_profile


def test_phase_profile_attributes_the_client_phases(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_profile.main(["--clients", "3", "--rounds", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_update = {k.split(" [")[0]: v for k, v in summary.items() if k.endswith("ms_per_update")}
    for label in ("ClientApp train (all)", "… local training (local_round)", "… base handling (resolve_base)",
                  "… … compressed downlink", "… encoding + error feedback (encode_reply)",
                  "server: judging replies", "server: commit + evaluation"):  # fmt: skip
        assert per_update[label] > 0, label
    parts = (
        "… local training (local_round)",
        "… base handling (resolve_base)",
        "… encoding + error feedback (encode_reply)",
    )
    assert sum(per_update[p] for p in parts) <= per_update["ClientApp train (all)"]


def test_accuracy_at_both_codecs(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_profile.main(["--clients", "3", "--rounds", "2", "--accuracy"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("codec", "dense"):
        assert 0.0 <= summary[f"accuracy_{name}_3"] <= 1.0
    assert summary["bytes_per_round_dense_3"] > 5 * summary["bytes_per_round_codec_3"]
