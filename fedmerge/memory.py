"""Process-level memory settings for long-running servers.

glibc raises its mmap threshold dynamically after a large block is freed (up to 32 MiB), so
tensors freed after each client reply are then carved out of the heap, which fragments and does
not shrink: peak RSS creeps up with the number of replies even though nothing is retained.
:func:`use_mmap_for_large_allocations` pins the threshold (``mallopt(M_MMAP_THRESHOLD)``) so
every large block is mmapped and returned to the OS on free. It is a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3


def use_mmap_for_large_allocations(threshold_bytes: int = 1 << 20) -> bool:
    """Pin glibc's mmap threshold; returns whether it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
