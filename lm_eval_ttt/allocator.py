"""Training on CPU keeps the memory it frees, so each step reuses the pages of the step before.

A test-time training step frees and allocates again hundreds of megabytes: the gradients, Adam's
moments after each reset, the activations and the logits. glibc's malloc serves blocks above
its mmap threshold (at most 32 MB) with fresh mappings and gives them back on free, and trims
the top of its heap back to the kernel, so every step faults the same memory in again, one
zero-filled page at a time: on the bundled SmolLM2-135M about 1.2 million minor page faults per
document of 3 steps; with them gone a step takes 0.72x the seconds (``benchmarks/bench_allocator.py``).

``keep_freed_memory()`` has malloc serve every block from its heap and trim it only when more
than 2 GB lie free at its top, as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``
would at start-up.
The numbers do not change; the process keeps its peak memory until it exits, which test-time
training reaches again on every document. Left alone where the user tunes malloc already
(``GLIBC_TUNABLES`` names a ``glibc.malloc`` tunable) and where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_ABOVE = 2**31 - 1  # the largest value mallopt takes (an int): 2 GB free at the heap's top


def keep_freed_memory() -> bool:
    """Whether malloc now keeps freed memory for reuse (False: left as it was)."""
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
