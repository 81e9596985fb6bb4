"""The run page shows the federated evaluations recorded beside each version: a chart with one line
per aggregated metric and a table column, over real HTTP; without evaluations, an empty chart note."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch

from fedmerge.dashboard import start_in_background, views
from fedmerge.store import Contributor, ModelStore
from fedmerge.store.evaluations import Evaluation, NodeEvaluation, record_evaluation


def _store(root: Path, evaluate: bool) -> list[str]:
    base = {"w": torch.zeros(4)}
    with ModelStore.open(root) as st:
        parent = st.commit_base(base, name="tiny").id
        ids = [parent]
        for rnd in (1, 2, 3):
            v = st.commit(
                {"w": torch.full((4,), 0.01 * rnd)}, parents=[parent], method="fedavg", params={}, round=rnd,
                contributors=[Contributor("client-0", 10, f"{rnd:064x}")], metrics={}, privacy=None,
            )  # fmt: skip
            parent = v.id
            ids.append(v.id)
            if evaluate and rnd != 2:  # round 2 not evaluated (evaluate-every, or no valid reply)
                nodes = [NodeEvaluation("a", 10, True, None, {"loss": 1.0 / rnd, "eval_acc": 0.2 * rnd}),
                         NodeEvaluation("b", 0, False, "InvalidEvaluateReply: no metric")]  # fmt: skip
                record_evaluation(
                    st, Evaluation(v.id, rnd, {"loss": 1.0 / rnd, "eval_acc": 0.2 * rnd}, 10, nodes)
                )
    return ids


def test_run_view_carries_each_versions_evaluation(tmp_path: Path) -> None:
    ids = _store(tmp_path / "s", evaluate=True)
    with views.open_store(tmp_path / "s") as st:
        run = views.run_view(st, ids[-1])
    assert [p.evaluation for p in run.points] == [
        {"loss": 1.0, "eval_acc": 0.2},
        {},
        {"loss": pytest.approx(1 / 3), "eval_acc": pytest.approx(0.6)},
    ]
    assert [(p.evaluated, p.evaluate_dropped) for p in run.points] == [(1, 1), (0, 0), (1, 1)]
    series = dict(run.evaluation_series())
    assert series["loss"] == [(1.0, 1.0), (3.0, pytest.approx(1 / 3))]
    assert sorted(series) == ["eval_acc", "loss"]


@pytest.mark.parametrize("evaluate", [True, False])
def test_run_page_charts_the_evaluation(tmp_path: Path, evaluate: bool) -> None:
    _store(tmp_path / "s", evaluate=evaluate)
    d = start_in_background(tmp_path / "s", "127.0.0.1", 0, None)
    try:
        with urllib.request.urlopen(d.url + "/run", timeout=30) as r:
            html = r.read().decode()
    finally:
        d.stop()
    assert 'id="chart-evaluation"' in html and "federated evaluation" in html
    if evaluate:
        assert "eval_acc" in html and "(1 nodes, 1 dropped)" in html
    else:
        assert "no federated evaluation in this run" in html
