"""The optimizer: AdamW over parameter groups, OpenELM's schedule, gradient clipping.

Recipe (shared/SPEC.md §1): AdamW (b1 0.9, b2 0.95, eps 1e-8), weight decay 0.1 on 2-D
weights only (norm weights get none, the embedding is decayed; `optim.weight_decay_on="all"`
decays every parameter, OLMoE's recipe, SPEC §2), global-norm clip 1.0, linear
warmup from `init_lr` to `peak_lr`, then cosine (or linear) decay to
`final_lr_ratio * peak_lr` at the last step.

Parameter groups are labels over the trainable parameter tree (`param_groups`, the one place
that assigns them); each group gets its own AdamW (`optax.multi_transform`), so a group can
differ in weight decay and learning rate. Without muP the groups are `decay` / `no_decay`
(OpenELM's recipe; the optimizer state is laid out by these labels). With muP
(elmjax/mup.py) the 2-D weights split into `decay_hidden` (hidden matrices, learning rate x
`hidden_lr_scale` = base width / width) and `decay_other` (the embedding and an untied
output head, the base learning rate), as Cerebras trains BTLM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Step -> learning rate for `config.optim` over `total_steps` optimizer steps.

    Warmup is linear from `init_lr` at step 0 to `peak_lr` at step `warmup_steps`; the decay
    then reaches `final_lr_ratio * peak_lr` at `total_steps` and stays there.
    """
    peak = float(optim_config.peak_lr)
    final = peak * float(optim_config.final_lr_ratio)
    warmup = int(optim_config.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    if optim_config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak)
    elif optim_config.schedule == "linear":
        decay = optax.linear_schedule(peak, final, decay_steps)
    elif optim_config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"config field `optim.schedule`: is {optim_config.schedule!r}; "
            "allowed: cosine, linear, constant"
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([_warmup(float(optim_config.init_lr), peak, warmup), decay], [warmup])


def schedule_warning(optim_config, total_steps: int) -> str | None:
    """A warning when the run ends inside the warmup (a short test run of a config whose
    warmup is longer): its learning rate never reaches `peak_lr` (the last update, of step
    `total_steps - 1`, uses the rate named). None otherwise."""
    warmup = int(optim_config.warmup_steps)
    if warmup <= total_steps:
        return None
    reached = float(learning_rate_schedule(optim_config, total_steps)(total_steps - 1))  # the last update's
    return (f"warning: train.steps={total_steps} ends inside the warmup (optim.warmup_steps={warmup}): the learning "
            f"rate rises only to {reached:.3g}, not optim.peak_lr={float(optim_config.peak_lr):g}; for a short run "
            f"lower --config.optim.warmup_steps")


def _warmup(init: float, peak: float, steps: int) -> optax.Schedule:
    """`init + (peak - init) * step / steps`: exactly `init` at step 0 (optax's
    linear_schedule loses init's low bits to float32 cancellation when init << peak)."""

    def schedule(step):
        fraction = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return init + (peak - init) * fraction

    return schedule


DECAY, NO_DECAY = "decay", "no_decay"
DECAY_HIDDEN, DECAY_OTHER = "decay_hidden", "decay_other"  # muP's split of `decay`
# Top-level parameters that are muP's input and output layers (not hidden matrices).
_INPUT_OUTPUT = ("token_embeddings", "lm_head")
WEIGHT_DECAY_ON = ("matrices", "all")  # values of `optim.weight_decay_on`


def param_groups(params, mup: bool = False, decay_on: str = "matrices"):
    """The group label of every trainable parameter (a pytree of labels like `params`).

    Without muP: `decay` for the weights of two or more dimensions (linear kernels, stacked
    expert kernels, the embedding), `no_decay` for norm weights and biases (1-D). With `mup`:
    `decay_hidden` for those weights inside the blocks, `decay_other` for the embedding and an
    untied output head. `decay_on="all"` decays the 1-D parameters too (OLMoE, SPEC §2): they
    join `decay` (`decay_other` with muP).
    """
    if decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"config field `optim.weight_decay_on`: is {decay_on!r}; allowed: {', '.join(WEIGHT_DECAY_ON)}")

    def label(path, p):
        vector = jnp.ndim(p) < 2
        if vector and decay_on == "matrices":
            return NO_DECAY
        if not mup:
            return DECAY
        top = getattr(path[0], "key", getattr(path[0], "name", path[0]))
        return DECAY_OTHER if vector or top in _INPUT_OUTPUT else DECAY_HIDDEN

    return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params, mup: bool = False, decay_on: str = "matrices"):
    """True for parameters that get weight decay (every group but `no_decay`)."""
    return jax.tree.map(lambda label: label != NO_DECAY, param_groups(params, mup, decay_on))


def clip_by_global_norm(grads, grad_norm, max_norm: float):
    """`grads` scaled by min(1, max_norm / grad_norm), so their global norm is at most
    `max_norm`; `max_norm` 0 returns them unchanged.

    `grad_norm` is the caller's (the train step reports it anyway): computing it once saves
    a pass over the gradients that optax.clip_by_global_norm would make again.
    """
    if max_norm <= 0:
        return grads
    scale = jnp.minimum(1.0, max_norm / grad_norm)  # grad_norm 0 -> inf -> 1
    return jax.tree.map(lambda grad: grad * scale.astype(grad.dtype), grads)


def make_optimizer(optim_config, total_steps: int, hidden_lr_scale: float | None = None) -> optax.GradientTransformation:
    """AdamW for `config.optim` per parameter group; the schedule spans `total_steps` steps.

    `hidden_lr_scale` (muP, `elmjax.mup.hidden_lr_scale`): the hidden matrices' learning rate
    is the schedule times this; None keeps the two plain groups. Weight decay is decoupled
    and multiplied by each group's learning rate (optax.adamw, like torch's AdamW), so the
    hidden matrices' decay per step shrinks with their learning rate.

    Gradient clipping (`optim.clip_norm`) is not part of it: the train step clips with
    `clip_by_global_norm` before calling the optimizer.
    """
    schedule = learning_rate_schedule(optim_config, total_steps)

    def adamw(weight_decay: float, learning_rate=schedule):
        return optax.adamw(
            learning_rate, b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps),
            weight_decay=weight_decay,
        )

    decay = float(optim_config.weight_decay)
    decay_on = str(optim_config.get("weight_decay_on", "matrices"))
    if hidden_lr_scale is None:
        groups = {DECAY: adamw(decay), NO_DECAY: adamw(0.0)}
        return optax.multi_transform(groups, functools.partial(param_groups, decay_on=decay_on))
    scale = float(hidden_lr_scale)
    groups = {
        DECAY_HIDDEN: adamw(decay, lambda step: schedule(step) * scale),
        DECAY_OTHER: adamw(decay),
        NO_DECAY: adamw(0.0),
    }
    return optax.multi_transform(groups, functools.partial(param_groups, mup=True, decay_on=decay_on))
