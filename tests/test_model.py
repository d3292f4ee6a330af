"""Behaviour of the decoder: packing, initialisation, sharding names, GQA, dtypes, knobs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.config import openelm_config, validate
from elmjax.tree import path_name
from elmjax.kernels.reference import attention
from elmjax.layers.positions import alibi_slopes
from elmjax.layers.decoder import build_model, count_params
from model_helpers import forward


def tiny_config(model_dim=64, vocab_size=97, **model_overrides):
    config = openelm_config(
        num_layers=3, model_dim=model_dim, head_dim=16, peak_lr=1e-3, ffn_dim_divisor=32,
        vocab_size=vocab_size, max_seq_len=64, **model_overrides,
    )
    config.train.seq_len = 64
    return validate(config)


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config().model, seed=0)


def flat_params(model):
    return {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_packed_documents_give_the_same_logits_as_each_alone(model):
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 97, 7), rng.integers(0, 97, 12)
    packed = np.concatenate([first, second, [0]])[None]
    segment_ids = np.array([[1] * 7 + [2] * 12 + [0]])
    positions = np.concatenate([np.arange(7), np.arange(12), [0]])[None]
    logits = forward(model, packed, segment_ids, positions)[0]
    np.testing.assert_allclose(logits[:7], forward(model, first[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[7:19], forward(model, second[None])[0], atol=1e-5, rtol=0)


def test_packed_row_layout_does_not_change_logits(model):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 97, 5), rng.integers(0, 97, 9)
    ab = forward(model, np.concatenate([a, b])[None], [[1] * 5 + [2] * 9], [list(range(5)) + list(range(9))])[0]
    ba = forward(model, np.concatenate([b, a])[None], [[1] * 9 + [2] * 5], [list(range(9)) + list(range(5))])[0]
    np.testing.assert_allclose(ab[:5], ba[9:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ab[5:], ba[:9], atol=1e-5, rtol=0)


def test_initialisation_follows_openelm_scheme():
    config = tiny_config(model_dim=256, vocab_size=4000)
    params = flat_params(build_model(config.model, seed=1))
    d, num_layers = 256, 3
    assert np.std(params["token_embeddings"][...]) == pytest.approx(d**-0.5, rel=0.02)
    assert np.std(params["layers/0/attn/qkv_proj/kernel"][...]) == pytest.approx(d**-0.5, rel=0.03)
    assert np.std(params["layers/2/ffn/proj_1/kernel"][...]) == pytest.approx(d**-0.5, rel=0.03)
    output_std = d**-0.5 * (2 * num_layers) ** -0.5
    assert np.std(params["layers/1/attn/out_proj/kernel"][...]) == pytest.approx(output_std, rel=0.05)
    assert np.std(params["layers/1/ffn/proj_2/kernel"][...]) == pytest.approx(output_std, rel=0.03)
    assert np.all(params["layers/0/attn/q_norm/weight"][...] == 1.0)
    assert np.all(params["norm/weight"][...] == 1.0)


def test_openelm_has_no_biases_and_ties_embeddings(model):
    names = flat_params(model)
    assert not [n for n in names if n.endswith("bias")]
    assert "lm_head/kernel" not in names


def test_same_seed_same_weights_other_seed_other_weights():
    config = tiny_config()
    a, b, c = (flat_params(build_model(config.model, seed=s)) for s in (5, 5, 6))
    for name in a:
        np.testing.assert_array_equal(a[name][...], b[name][...])
    assert not np.array_equal(a["token_embeddings"][...], c["token_embeddings"][...])


def test_parameters_carry_logical_axis_names(model):
    axes = {n: v.get_metadata()["out_sharding"] for n, v in flat_params(model).items()}
    assert axes["token_embeddings"] == ("vocab", "embed")
    assert axes["layers/0/attn/qkv_proj/kernel"] == ("embed", "heads")
    assert axes["layers/0/attn/out_proj/kernel"] == ("heads", "embed")
    assert axes["layers/0/ffn/proj_1/kernel"] == ("embed", "mlp")
    assert axes["layers/0/ffn/proj_2/kernel"] == ("mlp", "embed")
    assert axes["layers/0/attn/q_norm/weight"] == ("norm",)


def test_gqa_query_head_j_reads_kv_head_j_div_groups():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 6, 8, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32)
    grouped = attention(q, k, v)
    repeated = attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2))  # interleave
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    """bf16 rounds every matmul input (8-bit mantissa, 2^-8 relative): through 3 layers the
    logits stay within 2% of their range of the float32 ones, while an error as small as one
    norm weight off by 5% moves them by more than that."""
    config = tiny_config(compute_dtype="bfloat16")
    tokens = np.arange(20)[None] % 97
    low_model = build_model(config.model, seed=0)
    low = forward(low_model, tokens)
    full = forward(build_model(tiny_config().model, seed=0), tokens)
    assert low.dtype == np.float32
    bound = 0.02 * np.abs(full).max()
    assert np.abs(low - full).max() <= bound
    low_model.layers[2].ffn_norm.weight[...] = low_model.layers[2].ffn_norm.weight[...] * 1.05
    assert np.abs(forward(low_model, tokens) - full).max() > bound


@pytest.mark.parametrize("policy", ["full", "dots", "save_attention_out"])
def test_remat_policy_leaves_gradients_unchanged(policy):
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 97)

    def grads(config):
        graphdef, params = nnx.split(build_model(config.model, seed=0), nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        return jax.jit(jax.grad(loss))(params)

    reference, rematted = grads(tiny_config()), grads(tiny_config(remat_policy=policy))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_alibi_slopes_match_the_paper():
    np.testing.assert_allclose(alibi_slopes(32), [2 ** (-h / 4) for h in range(1, 33)], rtol=1e-6)
    eight = [2 ** (-h) for h in range(1, 9)]
    sixteen_odd = [2 ** (-(h / 2)) for h in range(1, 17)][0::2]
    np.testing.assert_allclose(alibi_slopes(12), eight + sixteen_odd[:4], rtol=1e-6)


def test_architecture_knobs_build_and_run():
    """What OLMoE and BTLM change is configuration, not code: each knob builds and runs."""
    config = tiny_config(
        norm_type="layer_norm", use_bias=True, qk_norm="full", position_encoding="alibi",
        tie_embeddings=False, embedding_scale=14.6, logit_scale=0.222, attention_scale=1 / 16,
        norm_eps=1e-5,
    )
    model = build_model(config.model, seed=0)
    names = flat_params(model)
    assert "lm_head/kernel" in names and "layers/0/attn/qkv_proj/bias" in names
    assert "layers/0/attn_norm/bias" in names
    assert names["layers/0/attn/q_norm/weight"][...].shape == (model.schedule[0].num_query_heads * 16,)
    logits = forward(model, np.arange(10)[None])
    assert logits.shape == (1, 10, 97) and np.all(np.isfinite(logits))
    assert count_params(model) > count_params(build_model(tiny_config().model))
