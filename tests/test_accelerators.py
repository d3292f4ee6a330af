"""Which hardware JAX will run on, decided before a backend starts (elmjax/accelerators.py), and
that a CPU host with libtpu installed for dry runs runs every command without libtpu's
startup complaints."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elmjax import accelerators

ROOT = Path(__file__).resolve().parents[1]
LIBTPU_COMPLAINTS = ("Failed to find host bounds", "E0000", "Source Location Trace", "TPU_WORKER_HOSTNAMES")


def fake_host(monkeypatch, tmp_path, plugins, device_file, registered=()):
    """Installed distributions `plugins`, JAX plugins `registered` (jax_plugins) and a /dev tree
    holding `device_file`; returns the tree."""
    monkeypatch.setattr(accelerators, "_installed", lambda: ("numpy", *plugins))
    monkeypatch.setattr(accelerators, "_registered_plugins", lambda: list(registered))
    dev = tmp_path / "dev[1]"  # a directory name with glob characters in it
    dev.mkdir()
    if device_file:
        (dev / device_file).parent.mkdir(parents=True, exist_ok=True)
        (dev / device_file).touch()
    return dev


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
def test_runs_on_cpu_counts_an_accelerator_plugin_only_with_its_device(monkeypatch, tmp_path, plugin, device_file,
                                                                accelerator):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    dev = fake_host(monkeypatch, tmp_path, [plugin] if plugin else [], device_file)
    assert accelerators.runs_on_cpu(dev=str(dev)) is (not accelerator)


@pytest.mark.parametrize("plugins, device_file, registered, pinned", [
    (["libtpu"], None, (), True),  # a laptop with elmjax[tpu] for dry runs
    (["libtpu"], "vfio/0", (), False),  # a TPU VM
    (["libtpu", "jax-cuda12-plugin"], None, (), False),  # another accelerator may be here: leave JAX to choose
    (["libtpu", "jax-metal"], None, ("metal",), False),  # one the table does not know, found in jax_plugins
    (["jax-cuda12-plugin"], None, (), False),
    ([], None, (), False),  # nothing to skip
])
def test_only_a_libtpu_without_a_tpu_pins_the_cpu(monkeypatch, tmp_path, plugins, device_file, registered, pinned):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    dev = fake_host(monkeypatch, tmp_path, plugins, device_file, registered)
    assert accelerators.only_an_absent_tpu(dev=str(dev)) is pinned
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the user's choice stands
    assert accelerators.only_an_absent_tpu(dev=str(dev)) is False


def quiet_host_env() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JAX_PLATFORMS", "TPU_"))}
    return {**env, "PYTHONPATH": str(ROOT), "ELMJAX_COMPILATION_CACHE": ""}


def _libtpu_without_tpu() -> bool:  # whatever JAX_PLATFORMS the test run itself has
    saved = os.environ.pop("JAX_PLATFORMS", None)
    try:
        return accelerators.only_an_absent_tpu()
    finally:
        if saved is not None:
            os.environ["JAX_PLATFORMS"] = saved


needs_libtpu_without_tpu = pytest.mark.skipif(not _libtpu_without_tpu(), reason="needs libtpu installed and no TPU")


@needs_libtpu_without_tpu
def test_a_cpu_command_starts_without_libtpu_complaints():
    code = "from elmjax import accelerators; accelerators.skip_an_absent_tpu(); import jax; print(jax.devices()[0].platform)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=quiet_host_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "cpu", result.stderr[-2000:]
    assert not [line for line in result.stderr.splitlines() if line.startswith(LIBTPU_COMPLAINTS)], result.stderr
    assert "no TPU device is under /dev: running on the CPU (JAX_PLATFORMS=tpu forces the TPU)" in result.stderr


@needs_libtpu_without_tpu
def test_a_tpu_dry_run_starts_without_libtpu_complaints():
    result = subprocess.run([sys.executable, "-m", "elmjax.train", "--config=configs/tiny.py", "--dry_run",
                             "--topology=v5p:2x2x1"], cwd=ROOT, env=quiet_host_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 4 tpu devices (TPU v5), topology v5p:2x2x1" in result.stdout
    assert not [line for line in result.stderr.splitlines() if line.startswith(LIBTPU_COMPLAINTS)], result.stderr


@needs_libtpu_without_tpu
@pytest.mark.parametrize("topology, chips, hosts", [("v5p:2x2x1", 4, 1), ("v5p:2x2x2", 8, 2), ("v5e:4x4", 16, 4)])
def test_the_quieted_tpu_compiler_describes_multi_host_topologies_unchanged(topology, chips, hosts):
    """TPU_HOST_BOUNDS=1,1,1 describes this host, not the topology: a two-host v5p slice still
    has 8 chips on processes 0 and 1 (the same as without the defaults)."""
    code = ("from elmjax import accelerators; accelerators.quiet_tpu_compiler(); "
            "from jax.experimental import topologies; "
            f"d = topologies.get_topology_desc(platform='tpu', topology_name='{topology}').devices; "
            "print(len(d), len({x.process_index for x in d}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**quiet_host_env(), "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == [str(chips), str(hosts)], result.stderr[-2000:]
    assert not [line for line in result.stderr.splitlines() if line.startswith(LIBTPU_COMPLAINTS)], result.stderr
