"""Will the step fit? An analytic lower bound of a train step's per-device memory, checked
against the device before anything is compiled (an OOM after minutes of compiling, or a
host killed by the kernel, teaches nothing).

The bound counts only what the step cannot do without: the train state's shard (parameters,
optimizer moments), a gradient per trainable parameter, one float32 copy of the micro-batch's
logits (one piece of them with `model.logit_chunks`), and each layer's saved input (kept even
under full rematerialisation). Real use is
higher (XLA's temporaries, attention, the unsaved activations); `--dry_run` reports XLA's
own figure.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from elmjax.training.metrics import accelerator_spec
from elmjax.validation import ConfigError

GiB = 2**30


def _shard_bytes(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _ways(mesh, spec_entry) -> int:
    axes = () if spec_entry is None else ((spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry))
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64)) if axes else 1


def lower_bound(setup) -> dict:
    """Per-device bytes the step needs at least: {state, gradients, logits, activations, total}."""
    config, mesh = setup.config, setup.mesh
    state = sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(setup.abstract_state))
    state += sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(setup.abstract_frozen))
    gradients = sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(setup.abstract_state["params"]))
    batch_ways = _ways(mesh, setup.batch_sharding.spec[0])
    rows = max(config.train.batch_size // config.train.grad_accum_steps // batch_ways, 1)
    tokens = rows * config.train.seq_len
    vocab_ways = 1
    for logical, target in config.mesh.rules:
        if logical == "vocab":
            vocab_ways = _ways(mesh, target)
    # DPO's sequence log-probabilities take the whole logits; the LM loss one piece of them.
    pieces = 1 if config.train.objective == "dpo" else config.model.logit_chunks
    logits = -(-config.train.seq_len // pieces) * rows * (config.model.vocab_size // vocab_ways) * 4
    compute_bytes = np.dtype(config.model.compute_dtype).itemsize
    activations = config.model.num_layers * tokens * config.model.model_dim * compute_bytes
    total = state + gradients + logits + activations
    return {"state": state, "gradients": gradients, "logits": logits, "activations": activations, "total": total}


def device_capacity(device) -> tuple[int | None, str]:
    """(bytes one device can hold, where the figure comes from). Host devices share the host's
    available memory."""
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            available = int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        local = max(len([d for d in jax.local_devices() if d.platform == "cpu"]), 1)
        return available // local, f"host memory available, shared by {local} CPU device(s)"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - abstract (topology) devices have no stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory limit"
    spec = accelerator_spec(device.device_kind)
    if spec is not None:
        return spec[1], f"{device.device_kind} datasheet memory"
    return None, f"unknown memory for {device.device_kind!r}"


def check_fits(setup, log=print, *, refuse: bool = True) -> dict:
    """Raises ConfigError (naming train.batch_size) when the lower bound exceeds the device's
    memory, or with `refuse=False` logs that as a warning; returns the bound."""
    bound = lower_bound(setup)
    capacity, source = device_capacity(setup.mesh.devices.flat[0])
    if capacity is not None and bound["total"] > capacity:
        config = setup.config
        parts = ", ".join(f"{name} {bound[name] / GiB:.1f}" for name in ("state", "gradients", "logits", "activations"))
        need = (f"{config.train.batch_size} x {config.train.seq_len} tokens need at least {bound['total'] / GiB:.1f} "
                f"GiB per device ({parts} GiB) but a device has {capacity / GiB:.1f} GiB ({source})")
        if not refuse:
            log(f"warning: {need}: training would stop here; compiling anyway (a dry run allocates nothing)")
            return bound
        raise ConfigError(
            "train.batch_size",
            f"{need}; lower train.batch_size or train.seq_len, raise train.grad_accum_steps, or shard over more "
            "devices (mesh.fsdp)",
        )
    return bound
