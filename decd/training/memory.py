"""CPU memory reuse between training steps: `keep_freed_cpu_memory`, which `examples/train.py` applies in
plain sight when it trains on a CPU (it changes the whole process, so no constructor does it behind a reader's back)."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_applied_memory_reuse = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep the memory a CPU training step frees, so that the next step reuses it.

    Each step frees and re-allocates the same large buffers: the dense gradients of the 49,409-row token
    embedding and MCM output layer (25 MB each at width 128), activations, optimizer temporaries. glibc's
    defaults serve blocks of that size by `mmap` or trim them back to the kernel when freed, so every step
    faults in and zeroes fresh pages. This serves blocks under 1 GiB from the heap and never trims it: the
    process keeps its peak heap, as GPU caching allocators keep theirs, and steady-state steps fault almost
    nothing (`benchmarks/train_step.py` and `--memory glibc-defaults` count the page faults per step).

    Process-wide and not undone. Returns whether it applied: False off Linux with glibc (macOS, Windows,
    musl), where nothing is changed.
    """
    global _applied_memory_reuse
    if _applied_memory_reuse:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # mallopt's value is an int: -1 as the trim threshold is glibc's "never trim".
    _applied_memory_reuse = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied_memory_reuse


__all__ = ["keep_freed_cpu_memory"]
