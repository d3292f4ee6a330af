"""The train state, the loss, and one jit-compiled optimizer step.

The train state is a plain dict pytree, so optax, orbax and `jax.jit` see only arrays:
  params           pure dict of the float32 parameters that train (elmjax/trainable.py),
                   in `nnx.State.to_pure_dict()` layout
  opt_state        optax state of `make_optimizer`
  step             int32 scalar: optimizer steps taken
  nonfinite_steps  int32 scalar: steps whose update was skipped for a non-finite loss/grad
  nonfinite_streak int32 scalar: how many of the latest steps in a row were skipped

The frozen variables (what the trainable filter leaves out; usually none) are a separate
pure dict passed beside the state: they take part in the forward pass only.

A batch is a dict of [global_batch, seq] arrays with the keys of the data contract
(inputs, targets, segment_ids, positions, loss_mask).

The model's auxiliary losses (elmjax/layers/aux.py) are added to the loss with their weights,
and every auxiliary term is returned in the metrics as `aux/<name>`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elmjax.layers import adapters
from elmjax.layers import aux as aux_terms
from elmjax.parallel import sharding as shd
from elmjax.training import dpo, optim

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def init_train_state(params, optimizer) -> dict:
    """A fresh train state around `params` (pure dict)."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite_steps": jnp.zeros((), jnp.int32),
        "nonfinite_streak": jnp.zeros((), jnp.int32),
    }


def token_losses(logits, targets, z_loss_weight: float):
    """Per-token cross-entropy and z-loss, both float32 [batch, seq].

    logits [batch, seq, vocab] float32; targets [batch, seq] int. z-loss is
    `z_loss_weight * logsumexp(logits)^2` (SPEC §1).
    """
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logit, z_loss_weight * jnp.square(log_normalizer)


def chunked_token_losses(model, h, targets, z_loss_weight: float):
    """`token_losses` of the model's head over final hidden states h [batch, seq, model_dim],
    in `model.logit_chunks` pieces along the sequence, each rematerialised in the backward
    pass: only one piece's float32 logits [batch, seq / chunks, vocab] are alive at a time,
    for one more head matmul per piece."""
    if model.logit_chunks == 1:
        return token_losses(model.head(h), targets, z_loss_weight)
    piece = nnx.remat(lambda model, h, t: token_losses(model.head(h), t, z_loss_weight))
    bounds = np.linspace(0, h.shape[1], model.logit_chunks + 1).astype(int)
    parts = [piece(model, h[:, a:b], targets[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return tuple(jnp.concatenate(values, axis=1) for values in zip(*parts))


def summed_loss(params, frozen, graphdef, batch, z_loss_weight: float, scale=1.0, aux_scale=1.0, dropout_key=None):
    """`scale` * sums over `loss_mask` tokens of (ce + z), plus `aux_scale` * the weighted
    auxiliary losses. Returns (total, (ce, z, weighted aux losses, aux values)).

    `dropout_key`: the key of adapter dropout (elmjax/layers/adapters.py); None = no dropout.

    The train step passes scale = 1 / (the batch's loss tokens), so the gradient comes out
    already averaged (no extra pass over the gradients to divide them), and aux_scale =
    1 / micro-batches (auxiliary losses are means over a micro-batch).
    """
    model = nnx.merge(graphdef, params, frozen)
    with adapters.dropout_key(dropout_key):
        h, aux = model.hidden(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    ce, z = chunked_token_losses(model, h, batch["targets"], z_loss_weight)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce_sum, z_sum = jnp.sum(ce * mask) * scale, jnp.sum(z * mask) * scale
    aux_loss = aux_scale * aux_terms.weighted_sum(aux)
    aux_values = {name: value * aux_scale for name, value in aux_terms.values(aux).items()}
    return ce_sum + z_sum + aux_loss, (ce_sum, z_sum, aux_loss, aux_values)


def _micro_batches(batch, accum_steps: int, group: int = 1):
    """[batch, seq] -> [accum, batch/accum, seq]; micro-batch k takes row groups k, k+accum, ...

    Rows go in groups of `group` consecutive rows (2 for DPO's chosen/rejected pairs), so a
    group never straddles micro-batches. Interleaving keeps every device's rows spread over
    all micro-batches, so a batch sharded over the data axes needs no communication to split.
    """
    def split(x):
        groups = x.shape[0] // (accum_steps * group)
        x = jnp.swapaxes(x.reshape(groups, accum_steps, group, *x.shape[1:]), 0, 1)
        return x.reshape(accum_steps, groups * group, *x.shape[3:])

    return {key: split(value) for key, value in batch.items()}


def accumulate(grad_fn, params, batch, accum_steps: int, *, group: int = 1, dropout_key=None):
    """(grads, terms) summed over `accum_steps` micro-batches of `batch`.

    `grad_fn(params, micro_batch, dropout_key) -> (grads, terms)`, terms any pytree of arrays;
    micro-batch k's dropout key has k folded in.
    """
    if accum_steps == 1:
        return grad_fn(params, batch, dropout_key)

    def micro_step(carry, indexed):
        index, micro = indexed
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        return jax.tree.map(jnp.add, carry, grad_fn(params, micro, key)), None

    micro_batches = _micro_batches(batch, accum_steps, group)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(lambda: grad_fn(params, first, dropout_key))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals, _ = jax.lax.scan(micro_step, zeros, (jnp.arange(accum_steps), micro_batches))
    return totals


def loss_and_grads(params, frozen, graphdef, batch, *, z_loss_weight: float, accum_steps: int, dropout_key=None):
    """Mean loss over the batch's loss tokens and its gradient, accumulated in micro-batches.

    Every micro-batch's summed loss is divided by the whole batch's token count (and its
    auxiliary losses by the number of micro-batches), so the result equals the one-shot mean
    whatever `accum_steps` is.
    Returns (loss, ce, z, aux values, grads): losses float32 scalars, aux values a dict of
    the auxiliary terms (each averaged over micro-batches). `dropout_key` (adapter dropout)
    gets micro-batch k's index folded in.
    """
    inverse_tokens = 1.0 / jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = jax.grad(summed_loss, has_aux=True)

    def micro_grads(params, micro, key):
        return grad_fn(params, frozen, graphdef, micro, z_loss_weight, inverse_tokens, 1.0 / accum_steps, key)

    grads, (ce, z, aux_loss, aux) = accumulate(micro_grads, params, batch, accum_steps, dropout_key=dropout_key)
    return ce + z + aux_loss, ce, z, aux, grads


def dpo_loss_and_grads(params, frozen, graphdef, batch, *, dpo_config, accum_steps: int, dropout_key=None):
    """Mean DPO loss over the batch's pairs and its gradient (elmjax/training/dpo.py), pairs
    kept whole in micro-batches. Returns (loss, terms dict of pair means, grads)."""
    inverse_pairs = 2.0 / batch["inputs"].shape[0]
    grad_fn = jax.grad(dpo.summed_dpo_loss, has_aux=True)

    def micro_grads(params, micro, key):
        return grad_fn(params, frozen, graphdef, micro, beta=float(dpo_config.beta), kind=dpo_config.loss,
                       reference=dpo_config.reference, scale=inverse_pairs, dropout_key=key)

    grads, terms = accumulate(micro_grads, params, batch, accum_steps, group=2, dropout_key=dropout_key)
    return terms["loss"], terms, grads


def train_step(state, frozen, batch, *, graphdef, optimizer, schedule, z_loss_weight, accum_steps,
               clip_norm=0.0, dropout_seed=None, dpo_config=None):
    """One optimizer step. Returns (new_state, metrics dict of float32/int32 scalars).

    `frozen`: the variables that do not train (pure dict; may be empty).

    Gradients are clipped to global norm `clip_norm` (0 = no clipping) before `optimizer`;
    the reported `grad_norm` is the norm before clipping.

    A non-finite loss or gradient norm leaves params and optimizer state unchanged (the
    host decides whether to abort); `nonfinite_steps` counts such steps.

    `dropout_seed`: adapter dropout draws from (seed, step), so a resumed run repeats the
    masks of an uninterrupted one; None = no dropout. `dpo_config`: train on preference pairs
    with DPO's loss (`config.dpo`) instead of the next-token loss; its terms are reported as
    `dpo/<name>`.
    """
    params = state["params"]
    dropout_key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
    if dpo_config is None:
        loss, ce, z, aux, grads = loss_and_grads(
            params, frozen, graphdef, batch, z_loss_weight=z_loss_weight, accum_steps=accum_steps,
            dropout_key=dropout_key,
        )
        terms = {f"aux/{name}": value for name, value in aux.items()}
    else:
        loss, dpo_terms, grads = dpo_loss_and_grads(
            params, frozen, graphdef, batch, dpo_config=dpo_config, accum_steps=accum_steps, dropout_key=dropout_key
        )
        ce, z = dpo_terms["chosen_nll"], jnp.zeros((), jnp.float32)
        terms = {f"dpo/{name}": value for name, value in dpo_terms.items() if name != "loss"}
    grad_norm, finite, new_state = apply_gradients(state, grads, loss, optimizer=optimizer, clip_norm=clip_norm)
    metrics = {
        "loss": loss,
        "ce_loss": ce,
        "z_loss": z,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
        "finite": finite,
        "tokens": jnp.sum(batch["loss_mask"]),
        **terms,
    }
    return new_state, metrics


def apply_gradients(state, grads, loss, *, optimizer, clip_norm=0.0):
    """(gradient norm, whether loss and norm are finite, the state after one optimizer update
    with `grads`, or unchanged but counted when not finite); see `train_step`."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        clipped = optim.clip_by_global_norm(grads, grad_norm, clip_norm)
        updates, opt_state = optimizer.update(clipped, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A conditional (not a select) so a finite step costs no extra pass over the state.
    new_params, new_opt_state = jax.lax.cond(
        finite, update, lambda params, opt_state: (params, opt_state), state["params"], state["opt_state"]
    )
    return grad_norm, finite, {
        "params": new_params,
        "opt_state": new_opt_state,
        "step": state["step"] + 1,
        "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1).astype(jnp.int32),
    }


def eval_step(params, frozen, batch, *, graphdef):
    """Summed cross-entropy and token count over `loss_mask` (no z-loss): for perplexity."""
    _, (ce_sum, *_) = summed_loss(params, frozen, graphdef, batch, 0.0)
    return ce_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))


def state_shardings(abstract_state, param_shardings, mesh):
    """Shardings for the train state: optimizer moments follow their parameter, the rest
    (counters, step) is replicated."""
    replicated = shd.replicated(mesh)
    opt_shardings = _opt_state_shardings(abstract_state, param_shardings, replicated)
    return {
        "params": param_shardings,
        "opt_state": opt_shardings,
        "step": replicated,
        "nonfinite_steps": replicated,
        "nonfinite_streak": replicated,
    }


def _opt_state_shardings(abstract_state, param_shardings, replicated):
    """Each optimizer-state leaf whose tree path ends with a parameter's path (and has its
    shape) gets that parameter's sharding; every other leaf is replicated."""
    param_paths = {
        path: (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(abstract_state["params"]),
            jax.tree.leaves(param_shardings),
        )
    }

    def pick(path, leaf):
        for start in range(len(path)):
            match = param_paths.get(tuple(path[start:]))
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state["opt_state"])


def dropout_seed(config):
    """The adapter-dropout seed of a run (`train.seed`), or None when nothing drops out."""
    adapter = config.model.get("adapter")
    if adapter is None or adapter.kind == "none" or adapter.dropout == 0:
        return None
    return int(config.train.seed)


def step_options(config) -> dict:
    """The keyword arguments of `train_step` that come from the config (everything but the
    model's graphdef, the optimizer and the schedule)."""
    return {
        "z_loss_weight": float(config.train.z_loss),
        "accum_steps": int(config.train.grad_accum_steps),
        "clip_norm": float(config.optim.clip_norm),
        "dropout_seed": dropout_seed(config),
        "dpo_config": config.dpo if config.train.objective == "dpo" else None,
    }


def make_jit_train_step(config, graphdef, optimizer, schedule, shardings, frozen_shardings, batch_sharding, mesh):
    """`jax.jit` of `train_step` with explicit in/out shardings and the state donated."""
    step = functools.partial(
        train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule, **step_options(config)
    )
    rules = tuple(config.mesh.rules)

    def run(state, frozen, batch):
        with shd.use_rules(mesh, rules):
            return step(state, frozen, batch)

    batch_shardings = {key: batch_sharding for key in BATCH_KEYS}
    return jax.jit(
        run,
        in_shardings=(shardings, frozen_shardings, batch_shardings),
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_jit_eval_step(config, graphdef, param_shardings, frozen_shardings, batch_sharding, mesh):
    """`jax.jit` of the held-out sums under the same shardings as training: `eval_step`'s
    (summed cross-entropy, tokens), or for DPO (`dpo.eval_sums`) (summed terms, pairs)."""
    rules = tuple(config.mesh.rules)
    objective = config.train.objective if "objective" in config.train else "lm"

    def run(params, frozen, batch):
        with shd.use_rules(mesh, rules):
            if objective == "dpo":
                return dpo.eval_sums(params, frozen, graphdef, batch, beta=float(config.dpo.beta),
                                     kind=config.dpo.loss, reference=config.dpo.reference)
            return eval_step(params, frozen, batch, graphdef=graphdef)

    batch_shardings = {key: batch_sharding for key in BATCH_KEYS}
    return jax.jit(
        run, in_shardings=(param_shardings, frozen_shardings, batch_shardings), out_shardings=shd.replicated(mesh)
    )
