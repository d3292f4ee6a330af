"""Which hardware JAX will run on, decided from installed plugins and device files before any
backend starts (starting one is what this avoids: it takes seconds, and libtpu complains)."""
from __future__ import annotations

import functools
import glob
import importlib.metadata
import os

# JAX accelerator plugins (distribution name prefixes) and the device files (under /dev) their
# hardware shows up as: TPU VMs expose accel<n> or vfio/<n>, NVIDIA GPUs nvidia<n>, AMD GPUs
# kfd, GPUs under WSL2 dxg. A plugin without its device falls back to the CPU.
TPU_PLUGINS = ("libtpu", "jax-tpu")
_PLUGIN_DEVICES = {
    TPU_PLUGINS: ("accel*", "vfio/[0-9]*"),
    ("jax-cuda", "jax_cuda"): ("nvidia[0-9]*", "dxg"),
    ("jax-rocm", "jax_rocm"): ("kfd", "dxg"),
}


@functools.cache  # scanning the distributions takes ~50 ms; a command asks more than once
def _installed() -> tuple[str, ...]:
    return tuple((distribution.metadata["Name"] or "").lower() for distribution in importlib.metadata.distributions())


def _registered_plugins() -> list[str]:
    """JAX's own plugin registry (the `jax_plugins` entry points and namespace package): CUDA,
    ROCm, Metal, Neuron, ... whatever this module's table does not name."""
    import importlib.util
    import pkgutil

    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)]
    return names


def _has_devices(patterns, dev: str) -> bool:
    return any(glob.glob(os.path.join(glob.escape(dev), pattern)) for pattern in patterns)


def accelerator_present(dev: str = "/dev") -> bool:
    """Whether an installed JAX accelerator plugin finds its device files under `dev`."""
    names = _installed()
    return any(
        any(name.startswith(prefixes) for name in names) and _has_devices(patterns, dev)
        for prefixes, patterns in _PLUGIN_DEVICES.items()
    )


def runs_on_cpu(dev: str = "/dev") -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin with
    its device present (a CPU host with libtpu installed for TPU dry runs trains on its CPU)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not accelerator_present(dev)


def tpu_compiler_installed() -> bool:
    """Whether libtpu (the TPU runtime and compiler that `--dry_run --topology` uses) is
    installed."""
    return any(name.startswith(TPU_PLUGINS) for name in _installed())


def only_an_absent_tpu(dev: str = "/dev") -> bool:
    """Whether the one accelerator plugin installed is libtpu and this host has no TPU (a
    laptop or CPU server with `elmjax[tpu]` for dry runs), JAX_PLATFORMS being unset."""
    if os.environ.get("JAX_PLATFORMS", "").strip():
        return False
    names = _installed()
    plugins = [prefixes for prefixes in _PLUGIN_DEVICES if any(name.startswith(prefixes) for name in names)]
    return (plugins == [TPU_PLUGINS] and not _registered_plugins()
            and not _has_devices(_PLUGIN_DEVICES[TPU_PLUGINS], dev))


def skip_an_absent_tpu() -> bool:
    """Pins JAX to the CPU when `only_an_absent_tpu()`: JAX would fall back to the CPU anyway,
    after libtpu tried to start and printed five lines of complaints (every command, every
    process). One line says so on stderr, in case a TPU here shows up under other device
    files. Must run before a backend starts; returns whether it pinned."""
    if not only_an_absent_tpu():
        return False
    import sys

    import jax

    jax.config.update("jax_platforms", "cpu")
    print("elmjax: libtpu is installed but no TPU device is under /dev: running on the CPU "
          "(JAX_PLATFORMS=tpu forces the TPU)", file=sys.stderr)
    return True


def quiet_tpu_compiler() -> None:
    """For the TPU compiler on a host without TPUs (`--dry_run --topology`): no metadata
    server to ask, and this host is a lone worker. Said through libtpu's environment variables
    (kept if already set), which silences its startup complaints and leaves the topologies it
    describes unchanged (device counts and process indices checked for v4, v5e and v5p)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not _has_devices(_PLUGIN_DEVICES[TPU_PLUGINS], "/dev"):
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
