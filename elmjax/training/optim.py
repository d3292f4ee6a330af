"""The optimizer: AdamW over parameter groups, OpenELM's schedule, gradient clipping.

Recipe (shared/SPEC.md §1): AdamW (b1 0.9, b2 0.95, eps 1e-8), weight decay 0.1 on 2-D
weights only (norm weights get none, the embedding is decayed; `optim.weight_decay_on="all"`
decays every parameter, OLMoE's recipe, SPEC §2), global-norm clip 1.0, linear
warmup from `init_lr` to `peak_lr`, then cosine (or linear) decay to
`final_lr_ratio * peak_lr` at the last step.

Parameter groups are labels over the trainable parameter tree (`param_groups`, the one place
that assigns them); each group gets its own AdamW (`optax.multi_transform`), so a group can
differ in weight decay (and, with muP or adapters, in learning rate).
"""
from __future__ import annotations

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


def _warmup(init: float, peak: float, steps: int) -> optax.Schedule:
    """`init + (peak - init) * step / steps`: exactly `init` at step 0 (optax's
    linear_schedule loses init's low bits to float32 cancellation when init << peak)."""

    def schedule(step):
        fraction = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return init + (peak - init) * fraction

    return schedule


DECAY, NO_DECAY = "decay", "no_decay"
WEIGHT_DECAY_ON = ("matrices", "all")  # values of `optim.weight_decay_on`


def param_groups(params, decay_on: str = "matrices"):
    """The group label of every trainable parameter.

    `decay_on="matrices"`: `decay` for the weights of two or more dimensions (linear kernels,
    stacked expert kernels, the embedding), `no_decay` for norm weights and biases (1-D).
    `decay_on="all"`: every parameter is in `decay` (OLMoE decays norms too, SPEC §2).
    """
    if decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"config field `optim.weight_decay_on`: is {decay_on!r}; allowed: {', '.join(WEIGHT_DECAY_ON)}")
    if decay_on == "all":
        return jax.tree.map(lambda p: DECAY, params)
    return jax.tree.map(lambda p: DECAY if jnp.ndim(p) >= 2 else NO_DECAY, params)


def weight_decay_mask(params, decay_on: str = "matrices"):
    """True for parameters that get weight decay (the `decay` group)."""
    return jax.tree.map(lambda label: label == DECAY, param_groups(params, decay_on))


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


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    """AdamW for `config.optim` per parameter group; the schedule spans `total_steps` steps.

    Gradient clipping (`optim.clip_norm`) is not part of it: the train step clips with
    `clip_by_global_norm` before calling the optimizer.
    """
    schedule = learning_rate_schedule(optim_config, total_steps)

    def adamw(weight_decay: float):
        return optax.adamw(
            schedule, b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps),
            weight_decay=weight_decay,
        )

    groups = {DECAY: adamw(float(optim_config.weight_decay)), NO_DECAY: adamw(0.0)}
    decay_on = str(optim_config.get("weight_decay_on", "matrices"))
    return optax.multi_transform(groups, lambda params: param_groups(params, decay_on))
