"""The C allocator's part in a process's resident memory (RSS): glibc keeps what is freed unless told otherwise.

glibc's malloc serves a block above its mmap threshold with an mmap of its own, returned to the kernel when the
block is freed, and smaller blocks from its heap, which keeps what is freed for reuse. The threshold starts at
128 KiB and rises to the size of each mmapped block freed, up to 32 MiB: after the first large tensors are freed,
every tensor below 32 MiB (a 135M model's activations, a micro-batch's hidden states) comes from the heap, and its
freed pieces stay resident when they do not fit the next allocations. Measured on PPO with --lora on the default
job (README, "PPO with --lora"): 1.7 GB in use at the loss's peak, 4.1 GB of heap, most of it free.

Two remedies, each measured there: `release_freed_memory` (malloc_trim) between the phases that free gigabytes,
nearly free of cost, which the online loop calls; and MALLOC_MMAP_THRESHOLD_=1048576 in the environment, which gives
every block above 1 MiB its own mmap (the lowest RSS, but each such block's pages are faulted in anew at every
allocation: a third more time on the default job's PPO), left to the user.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version") else None


def release_freed_memory() -> bool:
    """Give the pages of the C heap's free blocks back to the kernel (glibc's malloc_trim(0)): the process's RSS drops
    to the memory in use plus what is not yet freed, instead of the most it ever held. A block used again is faulted
    back in (the kernel zeroes its pages). Returns whether memory was released (glibc only; elsewhere nothing to do
    here)."""
    libc = glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
