"""``fedmerge merge --suggest``: the suggestions agree with the committed benchmark results."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from fedmerge.cli import main
from fedmerge.recipes.suggest import SUGGESTIONS

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "merging" / "merging.json"


def _best(results: dict[str, dict[str, list[float]]]) -> str:
    return max(results, key=lambda m: statistics.fmean(results[m]["tuned"]))


def test_suggestions_name_the_benchmarks_best_methods() -> None:
    record = json.loads(RESULTS.read_text())
    by_setting = {s.setting.split(" ")[0]: s.method for s in SUGGESTIONS}
    assert by_setting["full"] == _best(record["results"])
    assert by_setting["LoRA"] == _best(record["lora"]["results"])


def test_merge_suggest_prints_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["merge", "--suggest"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    for s in SUGGESTIONS:
        assert f"{s.setting}: {s.method}" in out


def test_merge_without_a_recipe_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["merge"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--suggest" in err
