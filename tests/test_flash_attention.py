"""The Pallas flash-attention kernel (interpret mode on CPU) against the reference oracle.

Interpret mode runs the "streamed" kernels (the TPU structure: K/V blocks on an arbitrary
grid axis, statistics in scratch); tests marked with `kernels` also run the "loop" kernels
(the Triton structure) through the private `_kernels` switch.

Tolerances (elementwise, on outputs and on dq/dk/dv of a random linear loss):
- float32 inputs: |kernel - reference| <= 5e-5 + 5e-5 * |reference|.
- bfloat16 inputs: |kernel - float32 reference on the same bf16-rounded inputs|
  <= 1.6e-2 * max(1, max|reference|), i.e. four bf16 ulps of the largest value. The plain
  bf16 reference misses the float32 oracle by about as much (its own rounding); a wrong mask,
  scale or GQA head mapping misses by O(1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from elmjax.kernels.flash_attention import flash_attention
from elmjax.kernels.reference import attention
from elmjax.layers.positions import alibi_slopes

# (query heads, kv heads, head_dim) of the OpenELM variants' layers (SPEC §1): 270M/450M/1_1B
# use head_dim 64 with 12..32 query heads, 3B head_dim 128 with 12..24; GQA ratio 4.
OPENELM_HEADS = [(12, 3, 64), (16, 4, 64), (20, 5, 64), (24, 6, 64), (28, 7, 64), (32, 8, 64),
                 (12, 3, 128), (24, 6, 128)]
F32_TOL = dict(atol=5e-5, rtol=5e-5)
BF16_REL_TOL = 1.6e-2


def make_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype, num_segments):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq, heads, head_dim))
    k = rng.normal(size=(batch, seq, kv_heads, head_dim))
    v = rng.normal(size=(batch, seq, kv_heads, head_dim))
    # Weights of the linear loss whose gradient we compare; float32 so bf16 grads stay comparable.
    w = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), jnp.float32)
    segment_ids = None
    if num_segments > 1:  # packed rows: sorted document ids 1..num_segments, lengths random
        cuts = np.sort(rng.integers(0, seq, size=(batch, num_segments - 1)), axis=1)
        segment_ids = jnp.asarray(
            1 + (np.arange(seq)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32
        )
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), w, segment_ids


def outputs_and_grads(attend, q, k, v, w):
    """attend(q, k, v) and the gradient of sum(attend * w) in q, k, v, all as float32.

    One jit per call: eager dispatch of the interpreted kernels costs several times more.
    """
    def loss(q, k, v):
        out = attend(q, k, v).astype(jnp.float32)
        return jnp.sum(out * w), out

    @jax.jit
    def run(q, k, v):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [x.astype(jnp.float32) for x in (out, *grads)]

    return run(q, k, v)


def check_against_reference(dtype, seed, batch, seq, heads, kv_heads, head_dim, causal,
                            num_segments, use_alibi, scale, block_q, block_k, kernels=None):
    q, k, v, w, segment_ids = make_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype, num_segments)
    options = dict(
        segment_ids=segment_ids, causal=causal, scale=scale,
        alibi_slopes=alibi_slopes(heads) if use_alibi else None,
    )
    kernel = outputs_and_grads(
        lambda q, k, v: flash_attention(
            q, k, v, block_q=block_q, block_k=block_k, _kernels=kernels, **options
        ), q, k, v, w,
    )
    f32 = lambda x: x.astype(jnp.float32)
    oracle = outputs_and_grads(lambda q, k, v: attention(q, k, v, **options), f32(q), f32(k), f32(v), w)
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, oracle):
        if dtype == jnp.float32:
            np.testing.assert_allclose(got, want, **F32_TOL, err_msg=name)
        else:
            bound = BF16_REL_TOL * max(1.0, float(jnp.max(jnp.abs(want))))
            np.testing.assert_allclose(got, want, atol=bound, rtol=0, err_msg=name)


shapes = dict(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    seq=st.integers(1, 70),  # mostly not a multiple of the blocks
    heads=st.sampled_from(OPENELM_HEADS + [(4, 4, 32), (4, 1, 32), (6, 2, 80)]),
    causal=st.booleans(),
    num_segments=st.sampled_from([1, 3]),
    use_alibi=st.booleans(),
    scale=st.sampled_from([None, "1/d"]),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32)]),
)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def run_case(dtype, seed, batch, seq, heads, causal, num_segments, use_alibi, scale, blocks):
    num_heads, kv_heads, head_dim = heads
    check_against_reference(
        dtype, seed, batch, seq, num_heads, kv_heads, head_dim, causal, num_segments, use_alibi,
        1.0 / head_dim if scale == "1/d" else None, *blocks,
    )


@settings(max_examples=3, **SETTINGS)
@given(**shapes)
# Fixed examples, each variant at least once: 270M's first layers and 1_1B's last (float32),
# 450M's and 3B's (bfloat16); MHA and MQA; BTLM's head_dim 80 with ALiBi and the muP 1/d
# scale; odd lengths and packed rows throughout.
@example(seed=1, batch=1, seq=45, heads=(12, 3, 64), causal=True, num_segments=3,
         use_alibi=False, scale=None, blocks=(16, 16))
@example(seed=6, batch=1, seq=21, heads=(32, 8, 64), causal=True, num_segments=1,
         use_alibi=False, scale=None, blocks=(16, 16))
@example(seed=2, batch=2, seq=33, heads=(4, 4, 32), causal=False, num_segments=3,
         use_alibi=True, scale=None, blocks=(16, 32))
@example(seed=3, batch=1, seq=50, heads=(4, 1, 32), causal=True, num_segments=1,
         use_alibi=True, scale="1/d", blocks=(32, 16))
def test_float32_matches_reference(seed, batch, seq, heads, causal, num_segments, use_alibi, scale, blocks):
    run_case(jnp.float32, seed, batch, seq, heads, causal, num_segments, use_alibi, scale, blocks)


@settings(max_examples=2, **SETTINGS)
@given(**shapes)
@example(seed=8, batch=2, seq=19, heads=(24, 6, 64), causal=False, num_segments=3,
         use_alibi=False, scale=None, blocks=(16, 16))
@example(seed=4, batch=1, seq=37, heads=(24, 6, 128), causal=True, num_segments=3,
         use_alibi=False, scale=None, blocks=(16, 16))
@example(seed=5, batch=1, seq=29, heads=(6, 2, 80), causal=True, num_segments=3,
         use_alibi=True, scale="1/d", blocks=(16, 16))
def test_bfloat16_matches_float32_reference(seed, batch, seq, heads, causal, num_segments, use_alibi, scale, blocks):
    run_case(jnp.bfloat16, seed, batch, seq, heads, causal, num_segments, use_alibi, scale, blocks)


# (seq, heads, kv_heads, head_dim, block_q, block_k): several blocks each way, square and
# non-square tiles, a length that is not a multiple of either block, GQA 4 and 1.
SEVERAL_BLOCKS = [(96, 8, 2, 16, 16, 32), (100, 4, 1, 32, 32, 16), (64, 2, 2, 16, 16, 16)]


@pytest.mark.parametrize("kernels", ["streamed", "loop"])
@pytest.mark.parametrize("case", SEVERAL_BLOCKS, ids=lambda c: f"s{c[0]}h{c[1]}kv{c[2]}b{c[4]}x{c[5]}")
def test_several_kv_blocks_with_causal_skipping_segments_and_alibi(kernels, case):
    """Values and gradients over many (q block, kv block) tiles: causal skipping, packed
    documents whose boundaries fall inside tiles, ALiBi and the muP scale, float32."""
    seq, heads, kv_heads, head_dim, block_q, block_k = case
    check_against_reference(
        jnp.float32, seq, 2, seq, heads, kv_heads, head_dim, causal=True, num_segments=4,
        use_alibi=True, scale=1.0 / head_dim, block_q=block_q, block_k=block_k, kernels=kernels,
    )


@pytest.mark.parametrize("kernels", ["streamed", "loop"])
def test_bfloat16_non_causal_several_blocks(kernels):
    check_against_reference(
        jnp.bfloat16, 11, 1, 80, 8, 2, 32, causal=False, num_segments=3, use_alibi=False,
        scale=None, block_q=16, block_k=32, kernels=kernels,
    )


@pytest.mark.parametrize("kernels", ["streamed", "loop"])
def test_fewer_queries_than_keys_align_causal_mask_to_the_end(kernels):
    """q_len < kv_len (a chunk after a prefix): query i sits at key position kv_len - q_len + i,
    so the causal block ranges and clamped index maps use that offset."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 40, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 72, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 72, 2, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    slopes = alibi_slopes(4)
    kernel = outputs_and_grads(
        lambda q, k, v: flash_attention(
            q, k, v, alibi_slopes=slopes, block_q=16, block_k=16, _kernels=kernels
        ), q, k, v, w,
    )
    oracle = outputs_and_grads(lambda q, k, v: attention(q, k, v, alibi_slopes=slopes), q, k, v, w)
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, oracle):
        np.testing.assert_allclose(got, want, **F32_TOL, err_msg=name)


def test_causal_index_maps_fetch_each_visible_block_once():
    """The streamed kernels' clamped index maps: walking the grid in order, a new K/V block
    (forward, dq) or q block (dk/dv) is fetched exactly once per visible tile, never for a
    skipped one."""
    from elmjax.kernels.flash_streamed import _kv_block_for, _q_block_for
    from elmjax.kernels.flash_tiles import FlashConfig, visible_tiles

    for q_len, kv_len, block_q, block_k in [(64, 64, 16, 16), (96, 96, 16, 32), (40, 72, 16, 8)]:
        cfg = FlashConfig(
            scale=1.0, causal=True, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len,
            q_pad=-(-q_len // block_q) * block_q, kv_pad=-(-kv_len // block_k) * block_k,
            groups=1, has_segments=False, has_alibi=False, backend="interpret",
        )
        steps = [(i, j) for i in range(cfg.num_q_blocks) for j in range(cfg.num_kv_blocks)]
        fetched = [(i, int(_kv_block_for(cfg, i, j))) for i, j in steps]
        fetches = sum(a != b for a, b in zip([None] + fetched, fetched))
        assert fetches == visible_tiles(cfg)
        steps = [(j, i) for j in range(cfg.num_kv_blocks) for i in range(cfg.num_q_blocks)]
        fetched = [(j, int(_q_block_for(cfg, j, i))) for j, i in steps]
        fetches = sum(a != b for a, b in zip([None] + fetched, fetched))
        assert fetches == visible_tiles(cfg)


@pytest.mark.parametrize("kernels", ["streamed", "loop"])
def test_causal_kernels_never_touch_fully_masked_blocks(kernels):
    """NaNs placed where a query block's causal mask is all False must not reach it.

    Masking alone does not stop NaN (0 * NaN = NaN in p @ v), so finite rows prove the
    kernels skip the block; the non-causal run shows the poison does reach them otherwise.
    """
    q, k, v, w, _ = make_inputs(0, 1, 32, 2, 1, 16, jnp.float32, 1)
    after_first_block = jnp.arange(32)[None, :, None, None] >= 8
    poisoned_v = jnp.where(after_first_block, jnp.nan, v)  # keys of blocks 1..3
    poisoned_q = jnp.where(~after_first_block, jnp.nan, q)  # queries of block 0

    def run(causal, q, v):
        return outputs_and_grads(
            lambda q, k, v: flash_attention(
                q, k, v, causal=causal, block_q=8, block_k=8, _kernels=kernels
            ), q, k, v, w,
        )

    out, dq, _, _ = run(True, q, poisoned_v)  # forward and dq kernels: query block 0
    assert np.isfinite(out[:, :8]).all() and np.isfinite(dq[:, :8]).all()
    _, _, dk, dv = run(True, poisoned_q, v)  # dk/dv kernel: key blocks 1..3
    assert np.isfinite(dk[:, 8:]).all() and np.isfinite(dv[:, 8:]).all()
    out, _, _, _ = run(False, q, poisoned_v)
    assert np.isnan(out[:, :8]).all()


def test_segments_keep_packed_documents_apart():
    """A row packing two documents equals the two documents attended separately."""
    q, k, v, _, _ = make_inputs(7, 1, 24, 4, 2, 16, jnp.float32, 1)
    segment_ids = jnp.asarray([[1] * 10 + [2] * 14], jnp.int32)
    packed = flash_attention(q, k, v, segment_ids=segment_ids, block_q=8, block_k=8)
    first = flash_attention(q[:, :10], k[:, :10], v[:, :10], block_q=8, block_k=8)
    second = flash_attention(q[:, 10:], k[:, 10:], v[:, 10:], block_q=8, block_k=8)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), **F32_TOL)


@pytest.mark.parametrize(
    "shapes, kwargs, message",
    [
        (((1, 8, 6, 16), (1, 8, 4, 16)), {}, "must divide num_query_heads"),
        (((1, 8, 4, 16), (1, 8, 2, 8)), {}, "differ in batch or head_dim"),
        (((1, 32, 4, 16), (1, 32, 2, 16)), {"block_q": 12}, "multiple of 8"),
        (((1, 8, 4, 16), (1, 8, 2, 16)), {"backend": "cuda"}, "allowed: interpret, triton"),
        (((1, 8, 4, 16), (1, 4, 2, 16)), {}, "kv_len >= q_len"),
        (((1, 8, 4, 16), (1, 8, 2, 16)), {"alibi_slopes": jnp.ones(3)}, "alibi_slopes must be"),
    ],
)
def test_bad_inputs_name_the_problem(shapes, kwargs, message):
    q_shape, kv_shape = shapes
    q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k, **kwargs)
