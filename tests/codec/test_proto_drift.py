"""The committed generated code matches what grpcio-tools generates from protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_has_no_drift() -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_format_version_matches_the_package() -> None:
    import fedmerge
    from fedmerge.v1 import delta_pb2

    assert delta_pb2.DeltaPackage(format_version=fedmerge.FORMAT_VERSION).format_version == 1
