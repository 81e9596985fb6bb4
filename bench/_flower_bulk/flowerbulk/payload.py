"""Deterministic payload bytes and peak-RSS helpers shared by the ServerApp and the ClientApp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray


def make_payload(n_bytes: int, seed: int) -> NDArray[np.uint8]:
    """``n_bytes`` pseudo-random bytes: PCG64(seed) 64-bit words, little-endian, truncated to ``n_bytes``."""
    if n_bytes < 0:
        raise ValueError(f"payload size must be >= 0, got {n_bytes}")
    words = np.random.default_rng(seed).integers(
        0, np.iinfo(np.uint64).max, size=(n_bytes + 7) // 8, dtype=np.uint64, endpoint=True
    )
    return words.astype("<u8", copy=False).view(np.uint8)[:n_bytes]


def proc_status_bytes(field: str, pid: str = "self") -> int:
    """``field`` (e.g. ``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status`` in bytes; 0 where absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: str = "self") -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` = 5); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
