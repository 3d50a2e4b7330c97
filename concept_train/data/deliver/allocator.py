"""The C allocator of a process that makes batches: freed memory stays for the next batch.

A tokenized batch makes and frees a few MB of arrays every few milliseconds (the decoded cells,
each view's entries, the packed tensors). glibc's malloc, at its defaults, serves blocks above its
mmap threshold with fresh mappings and hands the free memory at the top of its heap back to the
kernel once it exceeds the trim threshold (both adapt, but only up to the largest block freed so
far): every batch then faulted its pages in again, ~1,500 page faults a batch of 128 cells of
1,500 genes, a third of its time. Fixed thresholds above a batch's working set stop that: the
same batches at 0 page faults, 1.2x the cells/s of the whole loader (BENCHMARKS.md).

The cost is memory the process keeps rather than returns: at most TRIM_THRESHOLD of free heap
beyond what it uses. Blocks above MMAP_THRESHOLD (a batch that large is rare) still get their
own mappings, returned when freed. Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 128 << 20

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None  # None: not tried in this process


def keep_freed_memory() -> bool:
    """Set this process's malloc thresholds (above); True when glibc took them. Idempotent, and
    inherited by processes forked after it (a spawned DataLoader worker calls it itself)."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform == "linux":
            try:  # the C library this process runs on (find_library would spawn ldconfig)
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # no mallopt to call
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            # mallopt returns 1 on success
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
    return _applied
