"""Training FLOPs, MFU and throughput, and the metrics writers (JSONL + TensorBoard).

FLOPs per token follow shared/SPEC.md §4, summed layer by layer because layers may differ
in width (OpenELM):
  6 * (matmul weights of the layer that a token uses) + 6 * seq_len * q_heads_i * head_dim
plus, by default, 6 * vocab * model_dim for the output-logit matmul (tied or not). The model
family says which weights a token uses (`ModelFamily.layer_matmul_params`: all of a dense
layer, the routed experts' share of an MoE layer). Norm weights are left out (they do no
matmul). `flops_per_token(..., include_output_head=False)` gives the bare SPEC §4 count.
This is the one FLOPs counter: MFU in training and every benchmark use it.
"""
from __future__ import annotations

import json
import math
from datetime import timedelta
import time

import jax
import jax.numpy as jnp
import numpy as np

from elmjax import models, storage

# device_kind -> (dense bf16 peak FLOP/s, memory bytes) per chip (SPEC §6). TPU kinds are
# matched exactly (a v5p reports "TPU v5", a v5e "TPU v5 lite"); GPU kinds by prefix.
GiB = 2**30
ACCELERATORS = {
    "TPU v4": (275e12, 32 * GiB),
    "TPU v5 lite": (197e12, 16 * GiB),
    "TPU v5e": (197e12, 16 * GiB),
    "TPU v5": (459e12, 95 * GiB),
    "TPU v5p": (459e12, 95 * GiB),
    "TPU v6 lite": (918e12, 32 * GiB),
    "TPU v6e": (918e12, 32 * GiB),
    "NVIDIA H100": (989e12, 80 * GiB),
    "NVIDIA H200": (989e12, 141 * GiB),
    "NVIDIA A100": (312e12, 80 * GiB),
}


def accelerator_spec(device_kind: str) -> tuple[float, int] | None:
    """(peak FLOP/s, memory bytes) of a device kind, or None if unknown."""
    if device_kind in ACCELERATORS:
        return ACCELERATORS[device_kind]
    for name, spec in ACCELERATORS.items():
        if name.startswith("NVIDIA") and device_kind.startswith(name):
            return spec
    return None


def layer_flops_per_token(model_config, seq_len: int) -> list[float]:
    """Training FLOPs per token of each transformer layer (weights + causal attention)."""
    family = models.get(model_config.family)
    per_layer = []
    for spec in family.layer_specs(model_config):
        attention = 6 * seq_len * spec.num_query_heads * model_config.head_dim  # causal: half of 12 * s * d_attn
        per_layer.append(6.0 * family.layer_matmul_params(model_config, spec) + attention)
    return per_layer


def flops_per_token(model_config, seq_len: int, *, include_output_head: bool = True) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    total = sum(layer_flops_per_token(model_config, seq_len))
    if include_output_head:
        total += 6.0 * model_config.vocab_size * model_config.model_dim
    return total


_measured_cpu_peak: float | None = None


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square `size` matmuls on the default device."""
    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def remeasure_cpu_peak() -> float:
    """Measure the CPU peak again and keep the higher figure: a peak measured while another
    process shared the cores is too low (and MFU comes out above 100%)."""
    global _measured_cpu_peak
    _measured_cpu_peak = max(_measured_cpu_peak or 0.0, measure_matmul_peak())
    return _measured_cpu_peak


def device_peak_flops(device=None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number came from). On CPU it is measured once
    per process with a float32 matmul (all host devices share the same cores, so it is the
    whole host's peak); unknown accelerators give (None, reason)."""
    global _measured_cpu_peak
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        if _measured_cpu_peak is None:
            _measured_cpu_peak = measure_matmul_peak()
        return _measured_cpu_peak, "measured float32 2048^3 matmul on this host"
    spec = accelerator_spec(device.device_kind)
    if spec is not None:
        return spec[0], f"datasheet peak of {device.device_kind}"
    return None, f"no known peak for {device.device_kind!r}; MFU not reported"


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_flops: float | None, num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    if not peak_flops:
        return None
    return tokens_per_sec * flops_per_tok / (peak_flops * num_devices)


class MetricsWriter:
    """Appends metrics to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/ (process 0 only);
    WORKDIR may be gs:// (metrics.jsonl grows by GCS compose, see elmjax/storage.py;
    tensorboardX uploads its event file to gs:// itself, at each flush).

    `first_step`: the first step this run logs (the step after the checkpoint it resumes from;
    0 for a fresh start, whose held-out evaluation may log step 0). Records from there on, left
    by a run that died before its next checkpoint, describe steps about to be trained again:
    they are dropped from metrics.jsonl and hidden in TensorBoard (its purge step), so each step
    appears once. None keeps everything."""

    def __init__(self, workdir, enabled: bool = True, first_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if enabled:
            workdir = storage.path(workdir)
            if first_step is not None:
                forget_from(workdir / "metrics.jsonl", first_step)
            self._jsonl = storage.AppendFile(workdir / "metrics.jsonl")
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=first_step)

    def write(self, step: int, metrics: dict) -> None:
        """One JSON line `{"step": step, **metrics}` and one scalar per numeric metric."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self._tensorboard.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def forget_from(jsonl, step: int) -> None:
    """Rewrites the metrics file `jsonl` (if any) without the records of `step` and later (in
    one replacing write); lines that do not parse are kept."""
    location = storage.path(jsonl)
    if not location.exists():
        return
    lines = location.read_text().splitlines(keepends=True)

    def later(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) >= step
        except (ValueError, KeyError, TypeError):
            return False

    kept = [line for line in lines if not later(line)]
    if len(kept) < len(lines):
        storage.write_text(location, "".join(kept))


def _plain(value):
    if isinstance(value, (np.generic, jax.Array)):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def console_line(step: int, total_steps: int, metrics: dict) -> str:
    """`step 120/600 | loss 5.4321 | lr 2.9e-03 | gnorm 0.81 | 5,432 tok/s | mfu 41.2% | 0.38 s/step
    | 0:00:45 elapsed, ETA 0:03:02` (elapsed and ETA when the metrics have them)."""
    parts = [f"step {step}/{total_steps}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
             f"gnorm {metrics['grad_norm']:.3g}", f"{metrics['tokens_per_sec']:,.0f} tok/s"]
    if metrics.get("mfu") is not None:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    parts.append(f"{metrics['step_time']:.3f} s/step")
    if metrics.get("elapsed") is not None and metrics.get("eta") is not None:
        parts.append(f"{timedelta(seconds=round(metrics['elapsed']))} elapsed, ETA {timedelta(seconds=round(metrics['eta']))}")
    return " | ".join(parts)
