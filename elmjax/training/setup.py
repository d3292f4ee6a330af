"""Everything the training loop needs before its first step: mesh, sharded train state
(fresh, resumed or fine-tuned), the compiled step, and the `--dry_run` report."""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.training import checkpoint as ckpt
from elmjax.training import optim
from elmjax.parallel import sharding as shd
from elmjax.training import step as ts
from elmjax.layers.decoder import abstract_model, build_model, count_params


@dataclasses.dataclass
class Setup:
    """The static pieces of a run (no arrays except through `abstract_state`)."""

    config: object
    mesh: jax.sharding.Mesh
    graphdef: object
    optimizer: object
    schedule: object
    param_shardings: dict
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings
    num_params: int


def build_setup(config, devices=None) -> Setup:
    """Mesh, shardings and the abstract train state for `config` (allocates nothing)."""
    mesh = shd.make_mesh(config.mesh, devices)
    model = abstract_model(config.model)
    graphdef, param_state = nnx.split(model, nnx.Param)
    param_shardings = shd.param_shardings(param_state, mesh, config.mesh.rules)
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), nnx.to_pure_dict(param_state))
    state_shardings = ts.state_shardings(abstract, param_shardings, mesh)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract, state_shardings,
    )
    return Setup(
        config=config, mesh=mesh, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
        param_shardings=param_shardings, state_shardings=state_shardings,
        batch_sharding=shd.batch_sharding(mesh, config.mesh.rules), abstract_state=abstract,
        num_params=count_params(model),
    )


def fresh_params(setup: Setup):
    """Initialised parameters created directly in their shardings (never whole on one device)."""
    config = setup.config

    def init():
        return nnx.to_pure_dict(nnx.split(build_model(config.model, config.train.seed), nnx.Param)[1])

    return jax.jit(init, out_shardings=setup.param_shardings)()


def initial_state(setup: Setup, workdir, data_iterator, log=print):
    """(step, state): resumed from WORKDIR's newest complete checkpoint, else started from
    `train.init_from`'s (or a params-only checkpoint's) parameters, else freshly initialised."""
    step, restored, kind = ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator)
    if kind == "train":
        log(f"resumed from {ckpt.checkpoint_dir(workdir) / str(step)} (step {step})")
        return int(step), restored
    if kind == "params":
        log(f"starting from the parameters of {ckpt.checkpoint_dir(workdir) / str(step)} with a fresh optimizer")
        params = restored["params"]
    elif setup.config.train.init_from:
        step_dir, params = ckpt.restore_params_for_init(setup.config.train.init_from, setup.abstract_state["params"])
        log(f"starting from the parameters of {step_dir} with a fresh optimizer")
    else:
        log(f"no checkpoint in {workdir}; initialising a new model (seed {setup.config.train.seed})")
        params = fresh_params(setup)
    init = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer), out_shardings=setup.state_shardings)
    return 0, init(params)


def abstract_batch(setup: Setup) -> dict:
    """ShapeDtypeStructs of one global batch in its sharding."""
    shape = (setup.config.train.batch_size, setup.config.train.seq_len)
    dtypes = {key: jnp.int32 for key in ts.BATCH_KEYS} | {"loss_mask": jnp.float32}
    return {key: jax.ShapeDtypeStruct(shape, dtypes[key], sharding=setup.batch_sharding) for key in ts.BATCH_KEYS}


def global_batch(setup: Setup, local_batch: dict) -> dict:
    """This process's rows -> global jax.Arrays sharded over the batch axes."""
    shape = (setup.config.train.batch_size, setup.config.train.seq_len)
    return {
        key: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(local_batch[key]), shape)
        for key in ts.BATCH_KEYS
    }


def compile_train_step(setup: Setup):
    """(compiled step, seconds to lower and compile) for the configured mesh and batch."""
    jitted = ts.make_jit_train_step(
        setup.config, setup.graphdef, setup.optimizer, setup.schedule,
        setup.state_shardings, setup.batch_sharding, setup.mesh,
    )
    start = time.perf_counter()
    compiled = jitted.lower(setup.abstract_state, abstract_batch(setup)).compile()
    return compiled, time.perf_counter() - start


def memory_report(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of a compiled step."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    report = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
    }
    report["total_bytes"] = (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    )
    return report


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of `compiled` from XLA's cost analysis (summed over devices' shards)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return None if not analysis else analysis.get("flops")


def dry_run(config, log=print) -> dict:
    """Builds, lowers and compiles the train step for the configured mesh; trains nothing."""
    setup = build_setup(config)
    compiled, seconds = compile_train_step(setup)
    memory = memory_report(compiled)
    gib = 2.0**30
    log(f"mesh {dict(setup.mesh.shape)} on {setup.mesh.devices.size} {jax.devices()[0].platform} devices")
    log(f"parameters: {setup.num_params:,}")
    log(f"batch {config.train.batch_size} x {config.train.seq_len} tokens, "
        f"grad_accum_steps {config.train.grad_accum_steps}, remat {config.model.remat_policy}")
    log(f"compile time: {seconds:.1f} s")
    if memory:
        log(f"per-device memory (XLA estimate): {memory['total_bytes'] / gib:.2f} GiB "
            f"(arguments {memory['argument_bytes'] / gib:.2f}, outputs {memory['output_bytes'] / gib:.2f}, "
            f"aliased {memory['alias_bytes'] / gib:.2f}, temporaries {memory['temp_bytes'] / gib:.2f})")
    return {"num_params": setup.num_params, "compile_seconds": seconds, **memory}
