"""Host-memory reuse: a freed large block is reused without page faults (elmjax.training.host_memory).

The settings are process-wide, so each case runs in its own Python process.
"""
import json
import subprocess
import sys
import textwrap
import types

import pytest

from elmjax.training import host_memory

# Mallocs, fills and frees a 256 MiB block three times, as XLA:CPU does with a step's
# temporaries, and prints the page faults of the last two rounds. (Not numpy: it asks for
# transparent huge pages, which hides the per-page cost.)
PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys
    from elmjax.training import host_memory
    applied = host_memory.apply(sys.argv[1])
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(256 * 2**20)
        ctypes.memset(block, 1, 256 * 2**20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults[1:]}))
""")
PAGES_IN_BLOCK = 256 * 2**20 // 4096
HUGE_PAGES_IN_BLOCK = 256 * 2**20 // 2**21


def run_probe(mode: str) -> dict:
    import os

    # The probe's own allocator settings only: none inherited from the environment.
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                            env=environment, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_reused_block_is_not_faulted_in_again():
    result = run_probe("on")
    assert result["applied"] is True
    assert max(result["faults"]) < PAGES_IN_BLOCK // 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_without_reuse_every_round_faults_the_block_in_again():
    """The cost the setting removes: glibc maps a fresh block for each large request
    (65,536 small pages here; 128 where transparent huge pages are always on)."""
    result = run_probe("off")
    assert result["applied"] is False
    assert min(result["faults"]) >= HUGE_PAGES_IN_BLOCK


def test_auto_is_on_only_when_jax_runs_on_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert host_memory.training_on_cpu() is False
    assert host_memory.apply("auto") is False  # nothing changed in this process
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.training_on_cpu() is True


@pytest.mark.parametrize("plugin, device_file, accelerator", [
    ("libtpu", None, False),  # libtpu installed on a CPU host for TPU dry runs
    ("libtpu", "accel0", True),  # TPU v4 / v5e VM
    ("libtpu", "vfio/0", True),  # TPU v5p / v6e VM
    ("libtpu", "vfio/vfio", False),  # the VFIO control node alone is no TPU
    ("jax-cuda12-plugin", "nvidia0", True),
    ("jax-cuda12-plugin", "nvidiactl", False),  # the driver without a GPU
    ("jax-cuda12-plugin", "dxg", True),  # a GPU under WSL2
    ("jax-rocm7-plugin", "kfd", True),
    (None, "nvidia0", False),  # a GPU but no plugin: JAX runs on the CPU
])
def test_auto_counts_an_accelerator_plugin_only_with_its_device(monkeypatch, tmp_path, plugin, device_file,
                                                                accelerator):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    installed = [types.SimpleNamespace(metadata={"Name": name}) for name in ("numpy", plugin) if name]
    monkeypatch.setattr(host_memory.importlib.metadata, "distributions", lambda: installed)
    dev = tmp_path / "dev[1]"  # a directory name with glob characters in it
    if device_file:
        (dev / device_file).parent.mkdir(parents=True, exist_ok=True)
        (dev / device_file).touch()
    assert host_memory.training_on_cpu(dev=str(dev)) is (not accelerator)
