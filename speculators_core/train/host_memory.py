"""Give freed tensor memory back to the operating system on a CPU (glibc).

A training step allocates and frees gigabytes of activations. glibc serves a large allocation
with its own ``mmap`` (returned to the system on ``free``) only above a threshold, and raises
that threshold to the size of every such block freed, up to 32 MiB on 64-bit systems; after
the first step most tensors of a draft at 8B shapes (a ``[2048, 4096]`` fp32 tensor is 32 MiB)
come from the heap, where freed memory stays with the process and fragments. Measured on one
EAGLE-3 step at Llama-3.1-8B shapes (``benchmarks/bench_scale.py``): 1.4 GB more resident
after the backward pass than the gradients account for. Fixing the threshold at 1 MiB
(``mallopt(M_MMAP_THRESHOLD)``, which also turns the adjustment off) returns every
activation's memory when it is freed, at the cost of a page fault per fresh page.

This changes only where memory comes from, never a value. GPU memory is not concerned (its
caching allocator is torch's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["MMAP_THRESHOLD", "return_freed_memory_to_os"]

logger = logging.getLogger(__name__)

#: Allocations of at least this many bytes get their own mapping (glibc's ``M_MMAP_THRESHOLD``).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_applied = False


def return_freed_memory_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True when applied.

    A no-op returning False where the C library is not glibc (macOS, musl) or refuses; applied
    once per process (the setting is process-wide).
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    if _applied:
        logger.debug("glibc mmap threshold fixed at %d bytes", threshold)
    return _applied
