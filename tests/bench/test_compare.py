"""``python -m bench compare A.json B.json``: ratios of two benchmark results."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedmerge.errors import ConfigError
from fedmerge_bench.compare import compare, last_json_object


def test_ratios_of_shared_numeric_keys_and_the_keys_of_one_side() -> None:
    a = {"updates_per_min_vs_flower": 0.6, "clients": 20, "zero": 0.0, "name": "x", "flag": True, "old": 1}
    b = {"updates_per_min_vs_flower": 1.5, "clients": 20, "zero": 2.0, "name": "y", "flag": False, "new": 3}
    out = compare(a, b)
    assert out["ratios"]["updates_per_min_vs_flower"] == pytest.approx(2.5)
    assert out["ratios"]["clients"] == 1.0
    assert math.isnan(out["ratios"]["zero"])
    assert "name" not in out["ratios"] and "flag" not in out["ratios"]
    assert out["only_a"] == ["old"] and out["only_b"] == ["new"]


def test_the_last_json_line_of_a_saved_output_is_read(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_text('table…\n{"a": 1}\n{not json\n{"a": 2, "b": 4}\ntrailing text\n')
    assert last_json_object(log) == {"a": 2, "b": 4}
    empty = tmp_path / "empty.log"
    empty.write_text("no result here\n")
    with pytest.raises(ConfigError, match="no line is a JSON object"):
        last_json_object(empty)


def test_the_command_prints_ratios_and_one_json_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"updates_per_min_vs_flower": 0.58, "fedmerge_updates_per_min": 2418.0}))
    b.write_text(
        "header\n" + json.dumps({"updates_per_min_vs_flower": 1.16, "fedmerge_updates_per_min": 4836.0})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fedmerge_bench", "compare", str(a), str(b)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["ratios"] == {"updates_per_min_vs_flower": 2.0, "fedmerge_updates_per_min": 2.0}
    bad = subprocess.run(
        [sys.executable, "-m", "fedmerge_bench", "compare", str(a), str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.json" in bad.stderr
