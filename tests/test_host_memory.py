"""Host-memory reuse: a freed large block is reused without page faults (elmjax.training.host_memory).

The settings are process-wide, so each case runs in its own Python process.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from elmjax import accelerators
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
    assert accelerators.runs_on_cpu() is False
    assert host_memory.apply("auto") is False  # nothing changed in this process
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert accelerators.runs_on_cpu() is True
