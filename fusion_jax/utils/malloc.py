"""Let glibc keep freed buffers on its heap, so XLA:CPU's per-call buffers are reused, not re-faulted.

XLA:CPU allocates each call's temporaries and outputs with ``malloc``. Buffers above glibc's mmap
threshold (128 KB, adapting up to 32 MB) are fresh ``mmap``s: the kernel zeroes and faults in every
page on first touch and unmaps it on ``free``. Measured on the merge kernels (2 cores, 4M-element
chunks): ~3 GB/s of page faults, i.e. a 16 MB temporary cost ~5 ms per call, more than its math.
Raising the mmap and trim thresholds keeps those blocks on the heap for the next call. The cost is that
up to ``trim_threshold`` bytes of freed memory stay mapped; peak RSS does not grow.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_applied = False


def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20) -> bool:
    """Set glibc's malloc thresholds once per process; a no-op (False) off glibc or when
    ``FUSION_JAX_MALLOC_TUNING=0``."""
    global _applied
    if _applied:
        return True
    if os.environ.get("FUSION_JAX_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # glibc versions that cap the mmap threshold (at 32 MB on 64-bit) refuse a larger value with 0
    if not libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    libc.mallopt(_M_TOP_PAD, top_pad)
    _applied = True
    return True
