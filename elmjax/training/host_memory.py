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
import glob
import importlib.metadata
import os
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


# JAX accelerator plugins (distribution name prefixes) and the device files (under /dev) their
# hardware shows up as: TPU VMs expose accel<n> or vfio/<n>, NVIDIA GPUs nvidia<n>, AMD GPUs
# kfd, GPUs under WSL2 dxg. A plugin without its device falls back to the CPU.
_PLUGIN_DEVICES = {
    ("libtpu", "jax-tpu"): ("accel*", "vfio/[0-9]*"),
    ("jax-cuda", "jax_cuda"): ("nvidia[0-9]*", "dxg"),
    ("jax-rocm", "jax_rocm"): ("kfd", "dxg"),
}


def _accelerator_present(dev: str = "/dev") -> bool:
    """Whether an installed JAX accelerator plugin finds its device files under `dev`,
    decided without starting a backend."""
    names = [(distribution.metadata["Name"] or "").lower() for distribution in importlib.metadata.distributions()]
    return any(
        any(name.startswith(prefixes) for name in names)
        and any(glob.glob(os.path.join(glob.escape(dev), pattern)) for pattern in patterns)
        for prefixes, patterns in _PLUGIN_DEVICES.items()
    )


def training_on_cpu(dev: str = "/dev") -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin with
    its device present (a CPU host with libtpu installed for TPU dry runs trains on its CPU)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not _accelerator_present(dev)


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
    if mode == "off" or (mode == "auto" and not training_on_cpu()):
        return False
    return keep_freed_host_memory()
