"""The model's attention dispatch, and a tiny-model train loss + gradient with pallas vs xla."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.config import load_config_file, validate
from elmjax.kernels.reference import attention
from elmjax.layers.attention import dot_product_attention
from elmjax.layers.decoder import build_model
from elmjax.training.step import loss_and_grads

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(impl: str):
    config = load_config_file(CONFIGS / "tiny.py")
    config.model.attention_impl = impl
    config.train.batch_size, config.train.seq_len = 2, 40
    return validate(config)


def packed_batch(config, seed=0):
    """Two rows of 40 tokens; the first packs documents of 13, 20 and 7 tokens."""
    rng = np.random.default_rng(seed)
    batch, seq = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, size=(batch, seq + 1))
    lengths = [[13, 20, 7], [40]]
    segment_ids = np.stack([np.repeat(np.arange(1, len(l) + 1), l) for l in lengths])
    positions = np.stack([np.concatenate([np.arange(n) for n in l]) for l in lengths])
    next_same_doc = np.concatenate(
        [segment_ids[:, 1:] == segment_ids[:, :-1], np.zeros((batch, 1), bool)], axis=1
    )
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.asarray(segment_ids, jnp.int32),
        "positions": jnp.asarray(positions, jnp.int32),
        "loss_mask": jnp.asarray(next_same_doc, jnp.float32),
    }


def loss_and_param_grads(impl: str):
    config = tiny_config(impl)
    model = build_model(config.model, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    run = jax.jit(lambda p, b: loss_and_grads(p, {}, graphdef, b, z_loss_weight=1e-4, accum_steps=1))
    loss, _, _, _, grads = run(params, packed_batch(config))
    return float(loss), grads


def test_tiny_model_train_loss_and_grads_pallas_equal_xla():
    """Same parameters, same packed batch: loss within 1e-5 relative, every gradient leaf
    within 1e-4 of its largest entry (float32 compute; interpret-mode kernel on CPU)."""
    loss_xla, grads_xla = loss_and_param_grads("xla")
    loss_pallas, grads_pallas = loss_and_param_grads("pallas")
    assert loss_pallas == pytest.approx(loss_xla, rel=1e-5)
    flat_xla = jax.tree_util.tree_leaves_with_path(grads_xla)
    flat_pallas = jax.tree.leaves(grads_pallas)
    assert len(flat_xla) == len(flat_pallas)
    for (path, want), got in zip(flat_xla, flat_pallas):
        bound = 1e-4 * float(jnp.max(jnp.abs(want))) + 1e-8
        np.testing.assert_allclose(got, want, atol=bound, rtol=0, err_msg=jax.tree_util.keystr(path))


def small_qkv():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 20, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 20, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 20, 2, 16)), jnp.float32)
    return q, k, v


def test_auto_on_cpu_is_the_reference():
    q, k, v = small_qkv()
    np.testing.assert_array_equal(dot_product_attention(q, k, v, impl="auto"), attention(q, k, v))


def test_pallas_impl_runs_the_kernel_in_interpret_mode_on_cpu():
    q, k, v = small_qkv()
    segment_ids = jnp.asarray([[1] * 7 + [2] * 13], jnp.int32)
    got = dot_product_attention(q, k, v, impl="pallas", segment_ids=segment_ids, scale=0.1)
    want = attention(q, k, v, segment_ids=segment_ids, scale=0.1)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize(
    "dtype, options, message",
    [
        (jnp.bfloat16, {}, "needs a CUDA GPU"),
        (jnp.float32, {}, r"needs bfloat16/float16 inputs \(got float32\)"),
        (jnp.bfloat16, {"segment_ids": jnp.ones((1, 20), jnp.int32)}, "no segment ids"),
        (jnp.bfloat16, {"alibi_slopes": jnp.ones(4)}, "no ALiBi"),
    ],
)
def test_cudnn_impl_refuses_what_it_cannot_run(dtype, options, message):
    q, k, v = (x.astype(dtype) for x in small_qkv())
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, k, v, impl="cudnn", **options)


def test_unknown_impl_names_the_allowed_ones():
    q, k, v = small_qkv()
    with pytest.raises(ValueError, match="allowed: auto, xla, pallas, cudnn"):
        dot_product_attention(q, k, v, impl="flash")


def test_pallas_under_sharding_rules_runs_per_shard():
    """With a mesh (data 4 x tensor 2 of the 8 host devices) the kernel runs inside a
    shard_map over batch and heads, and the result still equals the reference."""
    from elmjax.config import base_config
    from elmjax.layers.positions import alibi_slopes
    from elmjax.parallel.sharding import make_mesh, use_rules

    mesh_config = base_config().mesh
    mesh_config.tensor = 2
    mesh, rules = make_mesh(mesh_config), mesh_config.rules
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(4, 24, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(4, 24, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(4, 24, 2, 16)), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([[1] * 9 + [2] * 15], 4, axis=0), jnp.int32)
    slopes = alibi_slopes(8)

    def sharded(q, k, v, segment_ids):
        with use_rules(mesh, rules):
            return dot_product_attention(
                q, k, v, impl="pallas", segment_ids=segment_ids, alibi_slopes=slopes
            )

    jaxpr = jax.make_jaxpr(sharded)(q, k, v, segment_ids)
    assert "shard_map" in {eqn.primitive.name for eqn in jaxpr.eqns}
    got = jax.jit(sharded)(q, k, v, segment_ids)
    want = attention(q, k, v, segment_ids=segment_ids, alibi_slopes=slopes)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_pallas_refuses_rules_that_split_the_sequence():
    from elmjax.config import base_config
    from elmjax.parallel.sharding import make_mesh, use_rules

    mesh_config = base_config().mesh
    split_seq = {"batch": None, "seq": "data"}  # all 8 devices on the data axis
    rules = tuple((name, split_seq.get(name, axes)) for name, axes in mesh_config.rules)
    q, k, v = (x[:, :16] for x in small_qkv())
    with use_rules(make_mesh(mesh_config), rules):
        with pytest.raises(ValueError, match="needs whole sequences per device"):
            dot_product_attention(q, k, v, impl="pallas")
