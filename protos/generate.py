"""Regenerate (or, with ``--check``, verify) the Python code for ``protos/fedmerge/v1/*.proto``.

Run from anywhere: ``python protos/generate.py [--check]``. The generated modules land in
``fedmerge/v1/`` (importable as ``fedmerge.v1.delta_pb2``) together with ``.pyi`` stubs and gRPC
stubs. ``--check`` regenerates into a temporary directory and exits 1 listing every file that
differs from the committed one (drift between a ``.proto`` and its committed code).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTOS = ("fedmerge/v1/delta.proto", "fedmerge/v1/intake.proto")


def generate(out_dir: Path, protos: tuple[str, ...] = PROTOS) -> list[Path]:
    """Run protoc (from grpcio-tools) on ``protos`` into ``out_dir``; return the generated files."""
    from grpc_tools import protoc  # dev dependency, imported only when generating

    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return [out_dir / name for name in generated_names(protos)]


def generated_names(protos: tuple[str, ...] = PROTOS) -> list[str]:
    """Paths (relative to the output root) that protoc writes for ``protos``."""
    names = []
    for proto in protos:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def drift(protos: tuple[str, ...] = PROTOS) -> list[str]:
    """Relative paths of generated files that differ from (or are missing in) the repository."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), protos)
        bad = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = ROOT / rel
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                bad.append(str(rel))
        return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        bad = drift()
        for rel in bad:
            print(f"out of date: {rel} (run: python protos/generate.py)", file=sys.stderr)
        return 1 if bad else 0
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
