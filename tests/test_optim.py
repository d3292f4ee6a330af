"""The optimizer follows the paper's recipe: schedule, weight-decay mask, clipping, AdamW."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmjax.config import base_config
from elmjax.training.optim import (clip_by_global_norm, learning_rate_schedule, make_optimizer, schedule_warning,
                                   weight_decay_mask)


def optim_config(**overrides):
    optim = base_config().optim
    optim.update(overrides)
    return optim


def test_warmup_is_linear_from_init_lr_to_peak():
    schedule = learning_rate_schedule(optim_config(peak_lr=1e-3, init_lr=1e-6, warmup_steps=100), 1000)
    assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-4)  # float32 arithmetic
    assert float(schedule(50)) == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(1e-3, rel=1e-6)


def test_cosine_decays_to_final_ratio_of_peak_at_last_step():
    config = optim_config(peak_lr=1e-3, warmup_steps=100, final_lr_ratio=0.1, schedule="cosine")
    schedule = learning_rate_schedule(config, 1000)
    midpoint = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert float(schedule(550)) == pytest.approx(midpoint, rel=1e-5)
    assert float(schedule(1000)) == pytest.approx(1e-4, rel=1e-5)
    assert float(schedule(5000)) == pytest.approx(1e-4, rel=1e-5)  # stays at the floor


def test_linear_decay_reaches_final_ratio():
    config = optim_config(peak_lr=2e-3, warmup_steps=0, final_lr_ratio=0.5, schedule="linear")
    schedule = learning_rate_schedule(config, 100)
    assert float(schedule(0)) == pytest.approx(2e-3)
    assert float(schedule(50)) == pytest.approx(1.5e-3, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(1e-3, rel=1e-5)


def test_paper_schedule_for_270m():
    """SPEC §1: warmup from 1e-6 over 5000 steps, cosine to 0.1 x 5.3e-3 at 350k."""
    schedule = learning_rate_schedule(base_config().optim, 350_000)
    assert float(schedule(5000)) == pytest.approx(5.3e-3, rel=1e-6)
    assert float(schedule(350_000)) == pytest.approx(5.3e-4, rel=1e-5)


def test_weight_decay_mask_is_2d_weights_only():
    params = {"token_embeddings": jnp.ones((8, 4)), "norm": {"weight": jnp.ones((4,))},
              "layers": {0: {"attn": {"qkv_proj": {"kernel": jnp.ones((4, 12))}}}}}
    mask = weight_decay_mask(params)
    assert mask == {"token_embeddings": True, "norm": {"weight": False},
                    "layers": {0: {"attn": {"qkv_proj": {"kernel": True}}}}}


def test_adamw_decays_matrices_but_not_norms():
    """With zero gradients Adam's update is 0, so only decoupled decay moves parameters:
    p <- p - lr * wd * p for 2-D weights, unchanged for 1-D norm weights."""
    config = optim_config(peak_lr=0.1, init_lr=0.1, warmup_steps=0, schedule="constant",
                          weight_decay=0.5, clip_norm=0.0)
    optimizer = make_optimizer(config, 10)
    params = {"kernel": jnp.full((2, 3), 2.0), "weight": jnp.full((3,), 2.0)}
    state = optimizer.init(params)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["weight"], 0.0)


def test_clip_scales_gradients_to_the_global_norm():
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    clipped = clip_by_global_norm(grads, jnp.float32(5.0), 1.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-6)


def test_clip_leaves_small_gradients_and_disabled_clip_alone():
    grads = {"a": jnp.array([0.3, 0.4])}  # global norm 0.5
    np.testing.assert_array_equal(clip_by_global_norm(grads, jnp.float32(0.5), 1.0)["a"], grads["a"])
    big = {"a": jnp.array([30.0, 40.0])}
    np.testing.assert_array_equal(clip_by_global_norm(big, jnp.float32(50.0), 0.0)["a"], [30.0, 40.0])


def test_a_run_that_ends_inside_the_warmup_is_warned_with_the_rate_it_reaches():
    """The rate of the last update (step 19 of 20, 19/50 of the way up) is optax's linear
    warmup at that step."""
    import ml_collections
    import optax

    optim_config = ml_collections.ConfigDict(dict(init_lr=0.0, peak_lr=0.01, warmup_steps=50, final_lr_ratio=0.1,
                                                  schedule="cosine"))
    last = float(optax.linear_schedule(0.0, 0.01, 50)(19))
    assert schedule_warning(optim_config, 20) == (
        f"warning: train.steps=20 ends inside the warmup (optim.warmup_steps=50): the learning rate rises only to "
        f"{last:.3g}, not optim.peak_lr=0.01; for a short run lower --config.optim.warmup_steps")
    assert f"{last:.3g}" == "0.0038"
    assert schedule_warning(optim_config, 50) is None
