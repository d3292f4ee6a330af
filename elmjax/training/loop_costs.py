"""Compiler cost figures of a step that contains loops, with every iteration counted.

XLA's cost analysis (FLOPs, bytes, the TPU compiler's `optimal_seconds`) counts the body of a
while loop once, whatever its trip count. A train step has two kinds of loops: scanned runs
of layers (elmjax/layers/scan.py) and gradient accumulation's scan over micro-batches. So
`--dry_run` adds the missing iterations itself:

  step ~= accum_steps x (counted + sum over scanned runs of (layers - 1) x one layer)
          - (accum_steps - 1) x update

where "one layer" is a separate compile of one block of the run (forward, the remat
recomputation and backward, with its weights' all-gathers and gradient reductions) at the
micro-batch's shape on the same mesh, and "update" one of the optimizer update alone (norm,
clipping, AdamW over the parameter shard), which the step runs once, not per micro-batch.
Under DPO each run's term also holds (layers - 1) x a compile of the layer's forward alone:
the reference pass runs every scanned run once more, without a backward pass.
The result is an estimate composed of the compiler's estimates, and is labelled so.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from elmjax import trainable
from elmjax.layers.remat import REMAT_POLICIES
from elmjax.parallel import sharding as shd
from elmjax.training import step as ts
from elmjax.training.setup import abstract_with


def counted_costs(compiled) -> dict:
    """XLA's cost analysis of one device's program as it counts it (each loop body once):
    flops, and `optimal_seconds` (the compiler's step-time estimate) where the backend gives it."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    analysis = analysis or {}
    return {key: float(analysis[key]) for key in ("flops", "optimal_seconds") if analysis.get(key) is not None}


def compile_layer(setup, index: int, *, backward: bool = True):
    """(compiled forward + backward of layer `index` alone at the micro-batch's shape, seconds);
    with `backward=False` its forward alone (DPO's reference pass). The backward pass takes
    gradients of the layer's trainable variables only (none under adapters that skip the
    blocks), as the step does."""
    config, mesh, model = setup.config, setup.mesh, setup.model
    graphdef, params, frozen = trainable.split(model.layers[index], config.model)
    abstract_params, abstract_frozen = (
        abstract_with(shd.param_shardings(state, mesh, config.mesh.rules), nnx.to_pure_dict(state))
        for state in (params, frozen))
    rows = config.train.batch_size // config.train.grad_accum_steps
    seq = config.train.seq_len
    batch_spec = setup.batch_sharding.spec[0]
    hidden = jax.ShapeDtypeStruct(  # [batch, seq, model_dim]
        (rows, seq, config.model.model_dim), jnp.dtype(config.model.compute_dtype),
        sharding=NamedSharding(mesh, PartitionSpec(batch_spec, None, None)),
    )
    policy = REMAT_POLICIES.get(config.model.remat_policy)

    def probe(params, frozen, h):
        positions = jnp.broadcast_to(jnp.arange(seq), (rows, seq))
        segment_ids = jnp.ones((rows, seq), jnp.int32)

        def layer(params, h):
            return nnx.merge(graphdef, params, frozen)(h, model.rope(positions), segment_ids)[0]

        if not backward:
            return layer(params, h)
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy)
        out, vjp = jax.vjp(layer, params, h)
        return vjp(out)

    with shd.use_rules(mesh, config.mesh.rules):
        start = time.perf_counter()
        compiled = jax.jit(probe).lower(abstract_params, abstract_frozen, hidden).compile()
    return compiled, time.perf_counter() - start


def compile_update(setup):
    """(compiled optimizer update of the train state from gradients alone, seconds)."""
    config = setup.config
    params = setup.abstract_state["params"]
    clip_norm = ts.step_options(config)["clip_norm"]  # as the step clips

    def update(state, grads):
        return ts.apply_gradients(state, grads, jnp.zeros((), jnp.float32), optimizer=setup.optimizer,
                                  clip_norm=clip_norm)[2]

    jitted = jax.jit(update, in_shardings=(setup.state_shardings, setup.param_shardings),
                     out_shardings=setup.state_shardings, donate_argnums=(0,))
    with shd.use_rules(setup.mesh, config.mesh.rules):
        start = time.perf_counter()
        compiled = jitted.lower(setup.abstract_state, params).compile()
    return compiled, time.perf_counter() - start


def whole_step_costs(setup, compiled_step, log=print) -> dict:
    """{flops, optimal_seconds (where the backend gives it), loop_compile_seconds (the extra
    compiles: one layer per scanned run, two under DPO, the update), corrected} of the step with every loop
    iteration counted (see the module docstring). The extra compiles are slow, so `log` says
    which are coming."""
    config = setup.config
    counted = counted_costs(compiled_step)
    runs = setup.model.plan.scanned
    accum = config.train.grad_accum_steps
    # DPO's reference pass runs every scanned run once more, forward only.
    reference_pass = config.train.objective == "dpo"
    if not runs and accum == 1:
        return {**counted, "loop_compile_seconds": 0.0, "corrected": False}
    layer_part = f"one layer of each of the {len(runs)} scanned runs" + (
        " (forward and backward, and forward alone for DPO's reference pass)" if reference_pass else "")
    parts = ([layer_part] if runs else []) + (["the optimizer update alone"] if accum > 1 else [])
    log(f"counting every loop iteration in the cost figures: compiling {' and '.join(parts)} ...")
    schedule = setup.model.schedule
    total, seconds = dict(counted), 0.0
    for run in runs:
        widest = max(run, key=lambda i: schedule[i].ffn_dim)
        for backward in (True, False) if reference_pass else (True,):
            compiled, spent = compile_layer(setup, widest, backward=backward)
            seconds += spent
            for key, value in counted_costs(compiled).items():
                if key in total:
                    total[key] += (len(run) - 1) * value
    total = {key: accum * value for key, value in total.items()}
    if accum > 1:  # the update ran once, not accum times
        compiled, spent = compile_update(setup)
        seconds += spent
        for key, value in counted_costs(compiled).items():
            if key in total:
                total[key] -= (accum - 1) * value
    return {**total, "loop_compile_seconds": seconds, "corrected": True}
