"""muP as a shared facility (elmjax/mup.py): truncated-normal init, SPEC §3's multipliers and
init scales for BTLM, the optimizer's parameter groups and their learning rates, and the
linear-decay schedule of BTLM's recipe."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from configs.btlm_3b_8k import get_config as btlm_3b_config
from elmjax import mup
from elmjax.config import base_config, validate
from elmjax.layers.decoder import abstract_model
from elmjax.layers.init import host_value
from elmjax.training.optim import learning_rate_schedule, make_optimizer, param_groups
from elmjax.tree import path_name


def test_truncated_normal_draws_follow_scipys_truncated_normal():
    values = host_value("layers/0/attn/qkv_proj/kernel", (400, 500), np.float32, ("truncated_normal", 0.073, 2.0), 0)
    assert values.dtype == np.float32 and np.abs(values).max() <= 2 * 0.073
    reference = stats.truncnorm(-2.0, 2.0, scale=0.073)
    assert values.std() == pytest.approx(reference.std(), rel=5e-3)  # 0.88 x 0.073
    assert stats.kstest(values.ravel()[::37], reference.cdf).pvalue > 1e-3
    again = host_value("layers/0/attn/qkv_proj/kernel", (400, 500), np.float32, ("truncated_normal", 0.073, 2.0), 0)
    np.testing.assert_array_equal(values, again)  # drawn from (seed, path) alone


def init_rules_by_path(model_config) -> dict:
    state = nnx.state(abstract_model(model_config), nnx.Param)
    return {path_name(path): tuple(v.get_metadata()["init"]) for path, v in nnx.to_flat_state(state)}


def test_btlm_3b_init_is_specs():
    """SPEC §3: truncated normal at +-2 sigma; embedding 0.073, hidden 0.073/sqrt(10), block
    output projections 0.073/sqrt(10)/sqrt(2 x 32); biases 0, LayerNorm weights 1."""
    rules = init_rules_by_path(validate(btlm_3b_config()).model)
    hidden = 0.073 / math.sqrt(10)
    expected = {
        "token_embeddings": ("truncated_normal", 0.073, 2.0),
        "layers/0/attn/qkv_proj/kernel": ("truncated_normal", hidden, 2.0),
        "layers/0/ffn/proj_1/kernel": ("truncated_normal", hidden, 2.0),
        "layers/31/attn/out_proj/kernel": ("truncated_normal", hidden / math.sqrt(64), 2.0),
        "layers/31/ffn/proj_2/kernel": ("truncated_normal", hidden / math.sqrt(64), 2.0),
        "layers/0/attn/qkv_proj/bias": ("zeros",),
        "layers/0/attn_norm/weight": ("ones",),
        "layers/0/attn_norm/bias": ("zeros",),
        "norm/bias": ("zeros",),
    }
    for path, rule in expected.items():
        assert rules[path][0] == rule[0], path
        np.testing.assert_allclose(rules[path][1:], rule[1:], rtol=1e-12, err_msg=path)


def test_without_mup_the_init_and_multipliers_are_openelms():
    model = validate(base_config()).model
    assert not mup.enabled(model)
    assert init_rules_by_path(model)["layers/0/attn/qkv_proj/kernel"] == ("normal", 1280**-0.5)
    assert (mup.logit_multiplier(model), mup.attention_scale(model), mup.hidden_lr_scale(model)) == (1.0, 64**-0.5, None)


def test_an_explicit_attention_scale_wins_over_mups():
    config = btlm_3b_config()
    config.model.attention_scale = 0.5
    assert mup.attention_scale(validate(config).model) == 0.5


def tiny_params():
    return {
        "token_embeddings": jnp.full((6, 4), 0.5),
        "layers": {0: {"attn": {"qkv_proj": {"kernel": jnp.full((4, 12), 0.5), "bias": jnp.full((12,), 0.5)}},
                       "attn_norm": {"weight": jnp.ones((4,))}}},
        "norm": {"weight": jnp.ones((4,))},
    }


def test_param_groups_without_and_with_mup():
    plain = param_groups(tiny_params())
    assert plain["token_embeddings"] == plain["layers"][0]["attn"]["qkv_proj"]["kernel"] == "decay"
    assert plain["layers"][0]["attn"]["qkv_proj"]["bias"] == plain["norm"]["weight"] == "no_decay"
    labels = param_groups(tiny_params(), mup=True)
    assert labels["token_embeddings"] == "decay_other"
    assert labels["layers"][0]["attn"]["qkv_proj"]["kernel"] == "decay_hidden"
    assert labels["layers"][0]["attn"]["qkv_proj"]["bias"] == labels["norm"]["weight"] == "no_decay"


def test_without_mup_the_optimizer_state_keeps_openelms_layout():
    state = make_optimizer(base_config().optim, 10).init(tiny_params())
    assert set(state.inner_states) == {"decay", "no_decay"}
    mup_state = make_optimizer(base_config().optim, 10, hidden_lr_scale=0.1).init(tiny_params())
    assert set(mup_state.inner_states) == {"decay_hidden", "decay_other", "no_decay"}


def test_first_adam_step_moves_each_group_by_its_learning_rate():
    """Adam's first update is lr * g / (|g| + eps) = lr * sign(g) (bias correction makes
    m / sqrt(v) = g / |g|), plus decoupled decay lr * wd * p: so each parameter moves by its
    group's learning rate, hidden matrices at 0.1 x the base rate (BTLM's width scale)."""
    optim = base_config().optim
    optim.update(peak_lr=1.2e-2, init_lr=1.2e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, eps=1e-12)
    optimizer = make_optimizer(optim, 10, hidden_lr_scale=0.1)
    params = tiny_params()
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["layers"][0]["attn"]["qkv_proj"]["kernel"], -1.2e-3 * (1 + 0.1 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(updates["token_embeddings"], -1.2e-2 * (1 + 0.1 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(updates["layers"][0]["attn"]["qkv_proj"]["bias"], -1.2e-2, rtol=1e-5)
    np.testing.assert_allclose(updates["norm"]["weight"], -1.2e-2, rtol=1e-5)


def test_btlm_schedule_warms_up_95_steps_to_1_2e_2_then_decays_linearly_to_1_01e_4():
    config = validate(btlm_3b_config())
    schedule = learning_rate_schedule(config.optim, config.train.steps)
    assert float(schedule(0)) == 0.0
    assert float(schedule(95)) == pytest.approx(1.2e-2, rel=1e-6)
    middle = 95 + (config.train.steps - 95) // 2
    assert float(schedule(middle)) == pytest.approx((1.2e-2 + 1.01e-4) / 2, rel=1e-4)
    assert float(schedule(config.train.steps)) == pytest.approx(1.01e-4, rel=1e-5)
    assert float(schedule(config.train.steps + 1000)) == pytest.approx(1.01e-4, rel=1e-5)
