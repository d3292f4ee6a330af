"""Pallas flash attention: online-softmax forward, Pallas backward, GQA, masks, ALiBi.

`flash_attention(query, key, value, ...)` computes the same function as
`elmjax.kernels.reference.attention` without materialising the [q_len, kv_len] logits:

- forward: an online softmax over key blocks (running max `m`, running sum `l`, float32
  accumulator) per query block; it saves the logsumexp `m + log(l)` for the backward;
- causal masking skips key blocks past the diagonal, so fully masked tiles are never
  loaded or multiplied (flash_tiles.causal_kv_block_end);
- GQA: query head h reads kv head h // groups through the BlockSpec index_map, so kv heads
  are never repeated in memory; the dk/dv kernel sums over the group's query heads;
- lengths that are not a multiple of the block are padded here and the padded keys masked;
- the backward is a `jax.custom_vjp` whose dq and dk/dv kernels are also Pallas.

Two kernel families (flash_tiles.FlashConfig.kernels):
- "streamed" (Mosaic TPU, and interpret mode on CPU): K/V blocks stream through an
  innermost "arbitrary" grid axis with the softmax statistics in VMEM scratch, so VMEM use
  is independent of the sequence length (flash_streamed.py);
- "loop" (Triton GPU): one program per query block loops over key blocks in the kernel
  (below and flash_attention_bwd.py).

Backends: `triton` (GPU), `mosaic_tpu` (TPU), `interpret` (CPU, or anywhere for debugging);
the default follows `jax.default_backend()`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from elmjax.kernels import flash_streamed
from elmjax.kernels.flash_attention_bwd import flash_backward as loop_backward
from elmjax.kernels.flash_tiles import (
    BACKENDS,
    MASK_VALUE,
    FlashConfig,
    call_kwargs,
    causal_kv_block_end,
    cost_estimate,
    default_backend,
    scalar_table_spec,
    tile_logits,
)

# (block_q, block_k) per backend. Triton: 64x64 keeps the backward's tiles in shared memory
# for head_dim 128. TPU: 512x512 tiles: few grid steps (each has a fixed overhead), K/V
# re-read once per 512 queries, and a step's VMEM (double-buffered q/k/v/do tiles, float32
# accumulators, a few [512, 512] float32 temporaries) compiles within the default scoped
# VMEM limit on v4, v5e and v5p (tests/test_flash_attention_tpu.py). interpret: 128 (tests
# pass smaller blocks).
DEFAULT_BLOCKS = {"triton": (64, 64), "mosaic_tpu": (512, 512), "interpret": (128, 128)}
# On TPU a block that does not cover the whole (padded) sequence must be a multiple of 128
# (it is the lane dimension of a tile or of a logsumexp row); these are tried largest first.
TPU_BLOCK_CHOICES = (512, 384, 256, 128)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, cfg: FlashConfig):
    """One query block of one head.

    Refs: q [block_q, head_dim], k/v [kv_pad, head_dim] (the kv head of this query head);
    optional q_seg [block_q, 1], kv_seg [1, kv_pad], slopes [heads]; outputs
    o [block_q, head_dim] and lse [block_q, 1] float32.
    """
    refs = list(refs)
    q_seg_ref = kv_seg_ref = slopes_ref = None
    if cfg.has_segments:
        q_seg_ref, kv_seg_ref = refs.pop(0), refs.pop(0)
    if cfg.has_alibi:
        slopes_ref = refs.pop(0)
    o_ref, lse_ref = refs
    q_block = pl.program_id(2)
    q_start = q_block * cfg.block_q
    q = q_ref[...]
    q_seg = q_seg_ref[...] if cfg.has_segments else None
    slope = slopes_ref[pl.program_id(1)] if cfg.has_alibi else None

    def body(kv_block, carry):
        acc, m, l = carry  # [block_q, head_dim], [block_q, 1], [block_q, 1], float32
        k_start = pl.multiple_of(kv_block * cfg.block_k, cfg.block_k)
        k = k_ref[pl.ds(k_start, cfg.block_k), :]
        v = v_ref[pl.ds(k_start, cfg.block_k), :]
        kv_seg = kv_seg_ref[:, pl.ds(k_start, cfg.block_k)] if cfg.has_segments else None
        logits = tile_logits(cfg, q, k, q_start, k_start, q_seg, kv_seg, slope)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new)
        l = correction * l + jnp.sum(p, axis=1, keepdims=True)
        acc = correction * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    block_q, head_dim = q.shape
    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, causal_kv_block_end(cfg, q_block), body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _flash_forward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, slopes):
    """Padded BHSD forward: out [batch, q_heads, q_pad, head_dim], lse [..., q_pad, 1] f32."""
    batch, heads, q_pad, head_dim = q.shape
    bq, kv_pad, groups = cfg.block_q, cfg.kv_pad, cfg.groups
    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, kv_pad, head_dim), lambda b, h, i: (b, lax.div(h, groups), 0, 0)
    )
    in_specs, extra = [q_spec, kv_spec, kv_spec], []
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, kv_pad), lambda b, h, i: (b, 0, 0)),
        ]
        extra += [q_seg[:, :, None], kv_seg[:, None, :]]
    if cfg.has_alibi:
        in_specs.append(scalar_table_spec(cfg))
        extra.append(slopes)
    cost = cost_estimate(
        cfg, batch * heads, head_dim, matmuls=2,
        bytes_accessed=2 * q.size * q.dtype.itemsize + (2 * k.size * k.dtype.itemsize) * groups,
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(batch, heads, cfg.num_q_blocks),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad, 1), jnp.float32),
        ],
        **call_kwargs(cfg, 3, "flash_attention_fwd", cost),
    )(q, k, v, *extra)


def _forward(cfg: FlashConfig, *args):
    if cfg.kernels == "streamed":
        return flash_streamed.flash_forward(cfg, *args)
    return _flash_forward(cfg, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash_core(q, k, v, q_seg, kv_seg, slopes, cfg):
    return _forward(cfg, q, k, v, q_seg, kv_seg, slopes)[0]


def _flash_core_fwd(q, k, v, q_seg, kv_seg, slopes, cfg):
    out, lse = _forward(cfg, q, k, v, q_seg, kv_seg, slopes)
    return out, (q, k, v, q_seg, kv_seg, slopes, out, lse)


def _flash_core_bwd(cfg, residuals, dout):
    q, k, v, q_seg, kv_seg, slopes, out, lse = residuals
    backward = flash_streamed.flash_backward if cfg.kernels == "streamed" else loop_backward
    dq, dk, dv = backward(cfg, q, k, v, q_seg, kv_seg, slopes, out, lse, dout)
    # Segment ids are integers and ALiBi slopes are fixed constants: no cotangent.
    return dq, dk, dv, None, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _fit_block(block: int | None, default: int, length: int, backend: str) -> int:
    """The block size used for a sequence of `length`; `block` None picks `default`.

    Never larger than needed. Triton wants power-of-two tiles of at least 16; interpret
    multiples of 8. Mosaic TPU: a sequence up to the default is one block (a multiple of
    16, bfloat16's sublane tile); a longer one gets the largest of TPU_BLOCK_CHOICES that
    pads it by at most 1/8, so e.g. 640 takes 128 (no padding) rather than 512 (1024).
    """
    if backend == "triton":
        return min(block or default, max(16, pl.next_power_of_2(length)))
    if backend == "mosaic_tpu" and block is None:
        if length <= default:
            return _round_up(length, 16)
        for choice in (c for c in TPU_BLOCK_CHOICES if c <= default):
            if _round_up(length, choice) - length <= length // 8:
                return choice
        return TPU_BLOCK_CHOICES[-1]
    return min(block or default, _round_up(length, 8))


def _check_inputs(query, key, value, segment_ids, kv_segment_ids, alibi_slopes, causal):
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "flash_attention expects [batch, seq, heads, head_dim] inputs; got shapes "
            f"query {query.shape}, key {key.shape}, value {value.shape}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape")
    batch, q_len, heads, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"query {query.shape} and key {key.shape} differ in batch or head_dim")
    if heads % key.shape[2]:
        raise ValueError(f"num_kv_heads={key.shape[2]} must divide num_query_heads={heads}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention supports float32, bfloat16, float16; got {query.dtype}")
    if causal and key.shape[1] < q_len:
        raise ValueError(
            f"causal flash_attention needs kv_len >= q_len; got {key.shape[1]} < {q_len}"
        )
    if segment_ids is not None and segment_ids.shape != (batch, q_len):
        raise ValueError(f"segment_ids must be [batch, q_len]={(batch, q_len)}; got {segment_ids.shape}")
    if kv_segment_ids is not None:
        if segment_ids is None:
            raise ValueError("kv_segment_ids needs segment_ids for the queries as well")
        if kv_segment_ids.shape != (batch, key.shape[1]):
            raise ValueError(
                f"kv_segment_ids must be [batch, kv_len]={(batch, key.shape[1])}; "
                f"got {kv_segment_ids.shape}"
            )
    if alibi_slopes is not None and alibi_slopes.shape != (heads,):
        raise ValueError(f"alibi_slopes must be [num_query_heads]=({heads},); got {alibi_slopes.shape}")


def flash_attention(
    query,
    key,
    value,
    *,
    segment_ids=None,
    kv_segment_ids=None,
    causal: bool = True,
    alibi_slopes=None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    _kernels: str | None = None,
):
    """Memory-linear softmax attention; differentiable in query, key and value.

    Args:
      query: [batch, q_len, num_query_heads, head_dim], float32 / bfloat16 / float16.
      key, value: [batch, kv_len, num_kv_heads, head_dim], same dtype; num_kv_heads divides
        num_query_heads and query head j uses kv head j // (num_query_heads // num_kv_heads).
      segment_ids: [batch, q_len] int; queries attend only to keys of the same id.
        kv_segment_ids [batch, kv_len] defaults to segment_ids.
      causal: mask keys after the query (aligned to the end when kv_len > q_len).
      alibi_slopes: [num_query_heads] float; adds -slope * (q_pos - k_pos). Not differentiated.
      scale: logit scale; default 1/sqrt(head_dim) (pass 1/head_dim for muP).
      block_q, block_k: tile sizes; default per backend (DEFAULT_BLOCKS), shrunk for short
        sequences.
      backend: "triton", "mosaic_tpu" or "interpret"; default from jax.default_backend().
      _kernels: tests only: "loop" runs the Triton kernels' structure in interpret mode.
    Returns:
      [batch, q_len, num_query_heads, head_dim] in the query's dtype. Softmax statistics and
      matmul accumulation are float32 for every input dtype.
    """
    _check_inputs(query, key, value, segment_ids, kv_segment_ids, alibi_slopes, causal)
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    kernels = _kernels or ("loop" if backend == "triton" else "streamed")
    if kernels not in ("streamed", "loop") or (backend, kernels) == ("triton", "streamed"):
        raise ValueError(f"_kernels={_kernels!r} cannot run on backend {backend!r}")
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    default_q, default_k = DEFAULT_BLOCKS[backend]
    bq = _fit_block(block_q, default_q, q_len, backend)
    bk = _fit_block(block_k, default_k, kv_len, backend)
    for name, block, length in (("block_q", bq, q_len), ("block_k", bk, kv_len)):
        if block % 8 or (backend == "triton" and block & (block - 1)):
            raise ValueError(f"{name}={block} must be a multiple of 8 (a power of two on Triton)")
        if backend == "mosaic_tpu" and block % 128 and block < length:
            raise ValueError(
                f"{name}={block} must be a multiple of 128 on TPU when it does not cover the "
                f"whole sequence ({length})"
            )
    cfg = FlashConfig(
        scale=float(head_dim**-0.5 if scale is None else scale),
        causal=bool(causal),
        block_q=bq,
        block_k=bk,
        q_len=q_len,
        kv_len=kv_len,
        q_pad=_round_up(q_len, bq),
        kv_pad=_round_up(kv_len, bk),
        groups=heads // kv_heads,
        has_segments=segment_ids is not None,
        has_alibi=alibi_slopes is not None,
        backend=backend,
        kernels=kernels,
        num_warps=4 if head_dim <= 64 else 8,
    )
    # Triton tiles must be powers of two: zero columns change neither q.k nor the kept output.
    padded_dim = pl.next_power_of_2(head_dim) if backend == "triton" else head_dim

    def to_bhsd(x, padded_len):  # [batch, seq, heads, d] -> [batch, heads, padded_len, d']
        x = jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, padded_dim - head_dim)))
        return x.transpose(0, 2, 1, 3)

    q = to_bhsd(query, cfg.q_pad)
    k, v = to_bhsd(key, cfg.kv_pad), to_bhsd(value, cfg.kv_pad)
    q_seg = kv_seg = slopes = None
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        # Padded rows get id 0; padded keys are masked by position, padded queries sliced off.
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, cfg.q_pad - q_len)))
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, cfg.kv_pad - kv_len)))
    if alibi_slopes is not None:
        slopes = lax.stop_gradient(alibi_slopes.astype(jnp.float32))
    out = _flash_core(q, k, v, q_seg, kv_seg, slopes, cfg)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]
