"""Compare two benchmark results: ``python -m bench compare A.json B.json``.

Each file is a benchmark's JSON line as saved (for instance ``python -m bench simulate --quick | tee
out.log``): the file's last line that parses as a JSON object is taken, so a whole saved output works
too. For every numeric key the two results share, prints A, B and B ÷ A (how B compares with A, e.g.
A from the parent commit and B from the commit under test); keys present in only one are listed.
The last line printed is one JSON object ``{"ratios": {KEY: B/A, ...}, "only_a": [...], "only_b": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fedmerge.errors import ConfigError


def last_json_object(path: Path) -> dict[str, Any]:
    """The last line of ``path`` that is a JSON object; a :class:`ConfigError` naming the file if none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise ConfigError(f"{path}: no line is a JSON object (expected a benchmark's last line)")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """B ÷ A for every key whose values are numbers in both (NaN where A is 0 and B is not)."""
    ratios: dict[str, float] = {}
    for key in a:
        x, y = _number(a[key]), _number(b.get(key))
        if x is None or y is None:
            continue
        ratios[key] = 1.0 if x == y else (y / x if x != 0 else math.nan)
    return {
        "ratios": ratios,
        "only_a": sorted(set(a) - set(b)),
        "only_b": sorted(set(b) - set(a)),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__)
    ap.add_argument("a", type=Path, help="the reference result (JSON line or saved output)")
    ap.add_argument("b", type=Path, help="the result to compare with it")
    args = ap.parse_args(argv)
    try:
        a, b = last_json_object(args.a), last_json_object(args.b)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = compare(a, b)
    width = max((len(k) for k in result["ratios"]), default=3)
    print(f"{'key':<{width}}  {'A':>14}  {'B':>14}  {'B / A':>8}")
    for key, ratio in result["ratios"].items():
        print(f"{key:<{width}}  {float(a[key]):>14.6g}  {float(b[key]):>14.6g}  {ratio:>8.3f}")
    for side in ("only_a", "only_b"):
        if result[side]:
            print(f"{side.replace('_', ' in ')}: {', '.join(result[side])}")
    print(json.dumps({**result, "ratios": {k: round(v, 4) for k, v in result["ratios"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
