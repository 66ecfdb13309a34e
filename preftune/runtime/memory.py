"""The C allocator's part in a process's resident memory (RSS): glibc keeps freed memory unless told otherwise.

glibc's malloc serves a block above its mmap threshold with an mmap of its own, returned to the kernel when the
block is freed, and smaller blocks from its heap, which keeps what is freed for reuse. The threshold starts at
128 KiB and rises to the size of each mmapped block freed, up to 32 MiB: after the first large tensors are freed,
every tensor below 32 MiB (a 135M model's activations, a micro-batch's hidden states) comes from the heap, whose
free pieces stay resident when they do not fit the next allocations. Measured on PPO with --lora on the default job
(README, "PPO with --lora"): 1.7 GB of in-use memory at the loss's peak, 4.1 GB of heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # as MALLOC_MMAP_THRESHOLD_=1048576 sets it


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def return_freed_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (mallopt M_MMAP_THRESHOLD, what MALLOC_MMAP_THRESHOLD_ sets
    at start-up): every block at least that large is its own mmap, given back to the kernel when freed, so the
    process's RSS follows the memory in use, not the most it ever held in blocks below 32 MiB. The price: each such
    block's pages are faulted in anew (the kernel zeroes them). For the rest of the process; a
    MALLOC_MMAP_THRESHOLD_ set by the user is kept. Returns whether it was set (glibc only)."""
    libc = glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
