"""`Linear` under a bfloat16 compute dtype: hidden layers return bfloat16 products (no float32
[batch, seq, out] cotangents in the backward pass); the untied output head returns float32
logits, as the tied head does. The oracle is numpy float64 on the bfloat16-rounded operands."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from elmjax.config import load_config_file
from elmjax.layers.decoder import build_model
from elmjax.layers.init import materialize
from elmjax.layers.linear import Linear


def _rounded(x):
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_a_hidden_linear_returns_its_bfloat16_product():
    layer = materialize(nnx.eval_shape(lambda: Linear(
        64, 96, init=("normal", 0.05), logical_axes=("embed", "mlp"), use_bias=False,
        compute_dtype=jnp.bfloat16, param_dtype=jnp.float32)), seed=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    y = layer(jnp.asarray(x))
    assert y.dtype == jnp.bfloat16
    # the product itself is bfloat16 (a float32 one cast down would give float32 cotangents)
    assert "preferred_element_type=float32" not in str(jax.make_jaxpr(layer)(jnp.asarray(x)))
    expected = _rounded(x) @ _rounded(layer.kernel[...])
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2**-7, atol=1e-2)


def test_the_untied_output_head_returns_float32_logits_under_bfloat16_compute():
    config = load_config_file("configs/tiny_moe.py")  # OLMoE: tie_embeddings=False
    config.model.compute_dtype = "bfloat16"
    model = build_model(config.model, seed=0)
    h = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, config.model.model_dim)), jnp.bfloat16)
    logits = model.head(h)
    assert logits.dtype == jnp.float32
    expected = _rounded(h) @ _rounded(model.lm_head.kernel[...]) * model.logit_scale
    # float32 accumulation of bfloat16 operands: far inside bfloat16's 2^-8 rounding of the result
    np.testing.assert_allclose(np.asarray(logits, np.float64), expected, rtol=1e-5, atol=1e-5)
