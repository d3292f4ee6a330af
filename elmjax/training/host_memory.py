"""Keep freed host memory for reuse, so a CPU train step does not page-fault its temporaries.

XLA:CPU allocates one buffer for all of a step's temporaries (about 3 GB for the 270M model
at batch 4 x 256) and frees it when the step ends. glibc serves such a large request with a
fresh `mmap` and returns it with `munmap`, so every step the kernel faults in and zeroes
~750,000 new pages: about 4 CPU-seconds of system time, 15-20% of the 270M step on two cores.

`keep_freed_host_memory()` tells glibc (via `mallopt`) to serve every request from one heap
that is never given back to the system: the next step's temporaries land on pages that are
already mapped, and the step runs with no page faults (bench/README.md has the figures).
The cost: the process keeps its peak footprint instead of returning freed memory.

It must run before the XLA backend (or PyTorch) starts its threads: a thread takes its malloc
arena at its first allocation, and only threads on the main arena get large blocks from the
reusable heap (any other arena still maps blocks larger than its 64 MiB heap with mmap).
Measured on a 2-core host; on a many-core host one arena may make threads wait on each
other's allocations, so compare with `off` there.
"""
from __future__ import annotations

import ctypes
import sys

from elmjax import accelerators

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory mapped and reuse it (one arena, no mmap, no trimming).

    Returns whether the settings took effect: False off Linux/glibc (macOS, musl), where
    nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # One arena: XLA's worker threads allocate from the main heap, which grows with brk and
    # can be kept; other arenas are capped at 64 MiB and fall back to mmap for big blocks.
    # No mmap: large blocks come from that heap too. Trim threshold -1 (SIZE_MAX in glibc):
    # freed memory is never returned, so the next step finds its pages already mapped.
    return bool(
        mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)
    )


def apply(mode: str) -> bool:
    """`config.train.reuse_host_memory`: "auto" (on when JAX runs on the CPU), "on", "off".

    Returns whether host memory is now kept for reuse.
    """
    if mode == "off" or (mode == "auto" and not accelerators.runs_on_cpu()):
        return False
    return keep_freed_host_memory()
