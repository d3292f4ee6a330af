"""Everything the training loop needs before its first step: mesh, sharded train state
(fresh, resumed or fine-tuned), and the compiled step."""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax import models, mup, trainable
from elmjax.validation import ConfigError, check_expert_axis
from elmjax.layers import adapters
from elmjax.layers.decoder import abstract_model, build_model
from elmjax.parallel import sharding as shd
from elmjax.training import checkpoint as ckpt
from elmjax.training import dpo, optim
from elmjax.training import step as ts


@dataclasses.dataclass
class Setup:
    """The static pieces of a run (no arrays except through `abstract_state`)."""

    config: object
    mesh: jax.sharding.Mesh
    model: object  # the Transformer with ShapeDtypeStruct parameters (its layer plan, layers' shapes)
    graphdef: object
    optimizer: object
    schedule: object
    param_shardings: dict  # of the trainable parameters
    frozen_shardings: dict  # of the frozen variables (elmjax/trainable.py; usually empty)
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings
    abstract_frozen: dict  # likewise, for the frozen variables
    num_params: int  # every parameter element
    num_trainable: int  # the elements that train


def abstract_with(shardings, tree):
    """`tree`'s leaves as `jax.ShapeDtypeStruct`s carrying the matching `shardings`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree, shardings
    )


def build_setup(config, devices=None) -> Setup:
    """Mesh, shardings and the abstract train state for `config` (allocates nothing)."""
    mesh = shd.make_mesh(config.mesh, devices)
    _check_batch_splits(config, mesh)
    family = models.get(config.model.family)
    if family.has_experts:  # mesh.expert may have been -1 (the devices left over)
        check_expert_axis(family.num_experts(config.model), mesh.shape["expert"])
    model = abstract_model(config.model)
    graphdef, train_state, frozen_state = trainable.split(model, config.model)
    param_shardings = shd.param_shardings(train_state, mesh, config.mesh.rules)
    frozen_shardings = shd.param_shardings(frozen_state, mesh, config.mesh.rules)
    optimizer = optim.make_optimizer(config.optim, config.train.steps, mup.hidden_lr_scale(config.model))
    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), nnx.to_pure_dict(train_state))
    state_shardings = ts.state_shardings(abstract, param_shardings, mesh)
    num_trainable, num_params = trainable.count(model, config.model)
    abstract_frozen = abstract_with(frozen_shardings, nnx.to_pure_dict(frozen_state))
    if dpo.uses_initial_reference(config):  # DPO's reference: a frozen copy of the starting weights
        frozen_shardings = dpo.with_reference(frozen_shardings, param_shardings)
        abstract_frozen = dpo.with_reference(abstract_frozen, abstract_with(param_shardings, abstract["params"]))
    return Setup(
        config=config, mesh=mesh, model=model, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
        param_shardings=param_shardings, frozen_shardings=frozen_shardings, state_shardings=state_shardings,
        batch_sharding=shd.batch_sharding(mesh, config.mesh.rules),
        abstract_state=abstract_with(state_shardings, abstract),
        abstract_frozen=abstract_frozen,
        num_params=num_params, num_trainable=num_trainable,
    )


def _check_batch_splits(config, mesh) -> None:
    """Each micro-batch's rows must split evenly over the mesh axes the batch is sharded on."""
    spec = shd.batch_sharding(mesh, config.mesh.rules).spec[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    ways = 1
    for axis in axes:
        ways *= mesh.shape[axis]
    accum = config.train.grad_accum_steps
    micro = config.train.batch_size // accum
    if micro % ways:
        raise ConfigError(
            "train.batch_size",
            f"is {config.train.batch_size}: {accum} micro-batch(es) of {micro} rows do not split over the "
            f"{ways} devices of mesh axes ({', '.join(axes)}); use a multiple of {ways * accum}",
        )


def fresh_variables(setup: Setup):
    """(trainable params, frozen variables) freshly initialised, created directly in their
    shardings (never whole on one device)."""
    config = setup.config

    def init():
        _, train_state, frozen_state = trainable.split(build_model(config.model, config.train.seed), config.model)
        return nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen_state)

    return jax.jit(init, out_shardings=(setup.param_shardings, setup.frozen_shardings))()


def fresh_params(setup: Setup):
    """Freshly initialised trainable parameters in their shardings."""
    return fresh_variables(setup)[0]


def frozen_variables(setup: Setup, log=print):
    """The frozen variables of a run: under adapters, the base model of `train.init_from`;
    otherwise from the initialisation seed (nothing is frozen by default, and then this is an
    empty dict without initialising anything)."""
    if not jax.tree.leaves(setup.abstract_frozen):
        return setup.abstract_frozen
    config = setup.config
    if dpo.uses_initial_reference(config):
        model_part = dpo.model_frozen(config, setup.abstract_frozen)
        own = frozen_variables(dataclasses.replace(setup, abstract_frozen=model_part), log) if jax.tree.leaves(model_part) else model_part
        step_dir, reference = ckpt.restore_params_for_init(config.train.init_from, setup.abstract_frozen["reference"])
        log(f"DPO reference: a frozen copy of the starting weights of {step_dir}")
        return dpo.with_reference(own, reference)
    if trainable.adapters_on(config.model):
        step_dir, frozen = ckpt.restore_params_for_init(config.train.init_from, setup.abstract_frozen)
        log(f"frozen base model from {step_dir}; training {config.model.adapter.kind} adapters only")
        return frozen
    return fresh_variables(setup)[1]


def fresh_adapters(setup: Setup, frozen):
    """Fresh adapter parameters; DoRA's magnitudes are set from the base kernels in `frozen`
    so the adapted model starts equal to its base."""
    params = fresh_params(setup)
    if setup.config.model.adapter.kind != "dora":
        return params

    def init(params, frozen):
        model = nnx.merge(setup.graphdef, params, frozen)
        adapters.init_magnitudes(model)
        return nnx.to_pure_dict(trainable.split(model, setup.config.model)[1])

    return jax.jit(init, out_shardings=setup.param_shardings)(params, frozen)


def initial_state(setup: Setup, workdir, data_iterator, log=print):
    """(step, state, frozen): resumed from WORKDIR's newest complete checkpoint, else started
    from `train.init_from`'s (or a params-only checkpoint's) parameters, else freshly
    initialised. `frozen` holds the variables that do not train (elmjax/trainable.py)."""
    frozen = frozen_variables(setup, log)
    step, restored, kind = ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator)
    if kind == "train":
        log(f"resumed from {ckpt.checkpoint_dir(workdir) / str(step)} (step {step})")
        if not getattr(data_iterator, "native", True):
            log(data_iterator.describe())
        return int(step), restored, frozen
    if kind == "params":
        log(f"starting from the parameters of {ckpt.checkpoint_dir(workdir) / str(step)} with a fresh optimizer")
        params = restored["params"]
    elif trainable.adapters_on(setup.config.model):
        params = fresh_adapters(setup, frozen)
    elif setup.config.train.init_from:
        step_dir, params = ckpt.restore_params_for_init(setup.config.train.init_from, setup.abstract_state["params"])
        log(f"starting from the parameters of {step_dir} with a fresh optimizer")
    else:
        log(f"no checkpoint in {workdir}; initialising a new model (seed {setup.config.train.seed})")
        params = fresh_params(setup)
    init = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer), out_shardings=setup.state_shardings)
    return 0, init(params), frozen


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
        setup.state_shardings, setup.frozen_shardings, setup.batch_sharding, setup.mesh,
    )
    start = time.perf_counter()
    compiled = jitted.lower(setup.abstract_state, setup.abstract_frozen, abstract_batch(setup)).compile()
    return compiled, time.perf_counter() - start
