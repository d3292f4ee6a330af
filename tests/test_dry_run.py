"""`--dry_run`: the real train step compiled for the configured mesh; with `--topology`, by the
TPU compiler for abstract TPU chips. A step that cannot fit stops before compiling."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TPU_SKIP_MDS_QUERY": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    return subprocess.run([sys.executable, "-m", "elmjax.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tiny_compiles_for_a_v5p_slice_with_the_tpu_compiler():
    pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (pip install -e '.[tpu]')")
    result = train("--config=configs/tiny.py", "--dry_run", "--topology=v5p:2x2x1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "on 4 tpu devices (TPU v5), topology v5p:2x2x1" in out
    assert "fits in 95.0 GiB (TPU v5 datasheet memory)" in out
    memory = out.split("per-device memory (XLA estimate): ")[1].splitlines()[0]
    assert "; peak of live buffers " in memory, memory
    total = float(memory.split(" GiB")[0])
    peak = float(memory.split("; peak of live buffers ")[1].split(" GiB")[0])
    assert peak <= total  # the compiler's own peak lies inside what it reserves (both to 0.01 GiB)
    ratio = float(out.split("compiled FLOPs per device per step: ")[1].split("(")[1].split("x SPEC")[0])
    assert 0.9 <= ratio <= 1.5  # the compiler counts SPEC §4's matmuls, the kernel's declared cost, norms
    assert "estimated step time (compiler's optimal_seconds, an estimate)" in out
    assert "estimated MFU" in out


@pytest.mark.parametrize("topology, kind, capacity", [("v4:2x2x1", "TPU v4", "32.0"), ("v5e:2x2", "TPU v5 lite", "16.0")])
def test_tiny_compiles_for_other_tpu_generations(topology, kind, capacity):
    """v4's topology describes each TensorCore as a device; jax runs a v4 chip as one (megacore),
    and its meshes refuse the cores (an AssertionError traceback)."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (pip install -e '.[tpu]')")
    result = train("--config=configs/tiny.py", "--dry_run", f"--topology={topology}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on 4 tpu devices ({kind}), topology {topology}" in result.stdout
    assert f"fits in {capacity} GiB ({kind} datasheet memory)" in result.stdout
    # libtpu 0.0.42's cost analysis for these two gives a negative optimal_seconds (v5p's a time).
    assert (f"no step-time estimate: the TPU compiler's cost analysis for {kind} gives no usable optimal_seconds "
            "(it reports -") in result.stdout


def test_an_unknown_topology_is_one_line():
    pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (pip install -e '.[tpu]')")
    result = train("--config=configs/tiny.py", "--dry_run", "--topology=v9z:1x1")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --topology=v9z:1x1: the TPU compiler cannot describe it")
    assert "; give a name such as v5p:2x2x1, v5e:2x2, v6e:2x2 or v4:2x2x1" in error and "pip install" not in error


def test_a_step_that_cannot_fit_a_chip_stops_before_compiling():
    """configs/270m.py at the paper's batch (2048 x 2048) on 4 v5p chips: logits alone are
    125 GiB a chip, of 95."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (pip install -e '.[tpu]')")
    result = train("--config=configs/270m.py", "--dry_run", "--topology=v5p:2x2x1")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: config field `train.batch_size`: 2048 x 2048 tokens need at least")
    assert "logits 125.0," in error and "but a device has 95.0 GiB (TPU v5 datasheet memory)" in error
    assert "lower train.batch_size" in error
    assert "compile time" not in result.stdout


def test_a_cpu_dry_run_beyond_this_hosts_memory_warns_and_compiles():
    """Forced CPU devices stand in for accelerators (README's 3B and OLMoE dry runs): they only
    split this host's memory, and a dry run allocates nothing."""
    result = train("--config=configs/tiny.py", "--dry_run", "--config.train.batch_size=262144",
                   "--config.train.seq_len=256")  # a TiB of logits: more than any host has
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: 262144 x 256 tokens need at least 1216.0 GiB per device (state 0.0, gradients 0.0, " \
        "logits 1024.0, " in result.stdout
    assert "training would stop here; compiling anyway (a dry run allocates nothing)" in result.stdout
    assert "compile time: " in result.stdout


def test_the_bound_counts_one_piece_of_the_logits_with_logit_chunks():
    """2048 x 2048 x 32000 float32 logits over 4 chips are 125 GiB a chip; a quarter with 4 pieces."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (pip install -e '.[tpu]')")
    result = train("--config=configs/270m.py", "--dry_run", "--topology=v5p:2x2x1", "--config.model.logit_chunks=4")
    assert result.returncode == 2
    assert "logits 31.2," in result.stderr.strip().splitlines()[-1]


def _flops(out):
    return float(out.split("compiled FLOPs per device per step")[1].split(": ")[1].split(" ")[0])


def test_scanned_layers_and_accumulation_count_every_iteration_like_the_unrolled_step():
    """XLA's cost analysis counts a loop body once; the dry run adds the other iterations.
    Oracle: the compiler's count for the same step with unrolled layers and no accumulation."""
    base = ["--config=configs/tiny_btlm.py", "--dry_run"]
    unrolled = train(*base, "--config.model.scan_layers=False")
    scanned = train(*base)
    accumulated = train(*base, "--config.train.grad_accum_steps=8")  # one row per micro-batch
    for result in (unrolled, scanned, accumulated):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "layers: 4, compiled as 1 bodies (runs of 4 layers;" in scanned.stdout
    assert "with every loop iteration counted" in scanned.stdout
    assert "with every loop iteration counted" not in unrolled.stdout
    expected = _flops(unrolled.stdout)
    assert _flops(scanned.stdout) == pytest.approx(expected, rel=0.01)
    # the optimizer update runs once per step, not per micro-batch: counting it 8 times would
    # be 1% over here
    assert _flops(accumulated.stdout) == pytest.approx(expected, rel=0.003)


@pytest.mark.parametrize("reference", [
    ["--config.dpo.reference=initial"],  # every weight trains; the reference is a frozen copy
    # LoRA on the embedding only: the blocks stay scanned, frozen (no weight gradients), and are
    # the reference with the adapter off
    ["--config.dpo.reference=base", "--config.model.adapter.kind=lora",
     "--config.model.adapter.targets=token_embeddings"],
], ids=["initial", "base_embedding_lora"])
def test_dpo_counts_the_reference_pass_through_scanned_runs_like_the_unrolled_step(reference):
    """DPO's reference pass runs each scanned run once more, forward only; the dry run adds
    those iterations too, and a frozen layer's probe takes no weight gradients. Oracle: the
    compiler's count for the unrolled DPO step. (No `train.init_from`: a dry run reads no
    weights, so DPO and adapters need no model to start from there.)"""
    base = ["--config=configs/tiny_btlm.py", "--dry_run", "--config.train.objective=dpo", *reference,
            "--config.train.stages=()"]
    unrolled = train(*base, "--config.model.scan_layers=False")
    scanned = train(*base)
    for result in (unrolled, scanned):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "forward alone for DPO's reference pass" in scanned.stdout
    # initial: without the reference pass's 3 extra layer forwards the count would be 14% low;
    # base: with weight gradients in the frozen layers' probe it was 14% high
    assert _flops(scanned.stdout) == pytest.approx(_flops(unrolled.stdout), rel=0.01)


def test_a_staged_run_compiles_every_stage_shape():
    """The last stage (8x the tokens per step here) is the one that must fit."""
    result = train("--config=configs/tiny_btlm.py", "--dry_run", "--config.train.steps=20",
                   "--config.train.stages=((10,64,32),(20,512,64))", "--config.train.stages_equal_tokens=False")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.index("stage 1/2: steps 1-10 at 32 x 64 tokens:") < out.index("batch 32 x 64 tokens") \
        < out.index("stage 2/2: steps 11-20 at 64 x 512 tokens:") < out.index("batch 64 x 512 tokens")
    assert out.count("per-device memory (XLA estimate): ") == 2
