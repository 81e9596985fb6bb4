"""Dispatch ``python -m bench NAME [args...]`` to ``bench/NAME.py``'s ``main(argv)``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    names = available()
    if not args or args[0] in {"-h", "--help"}:
        print("usage: python -m bench NAME [--quick] [options]\nbenchmarks: " + ", ".join(names))
        return 0 if args else 2
    name = args[0]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{name}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
