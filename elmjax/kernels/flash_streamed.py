"""Flash attention with K/V streamed through the grid: the Mosaic TPU (and interpret) kernels.

Every kernel's grid ends in an "arbitrary" (sequential) axis over blocks of the sequence it
reduces over, and keeps its running sums in VMEM scratch, so a grid step holds only a few
[block, head_dim] tiles and VMEM use does not grow with the sequence:

- forward, grid (batch, q head, q block, kv block): online softmax; scratch m, l [block_q, 1]
  and acc [block_q, head_dim] float32; writes out and the row logsumexp at the last kv block;
- dq, grid (batch, q head, q block, kv block): scratch dq [block_q, head_dim];
- dk/dv, grid (batch, kv head, kv block, group head, q block): scratch dk, dv
  [block_k, head_dim] summed over the kv head's query heads (GQA without repeating kv heads)
  and query blocks. Its tiles are keys-major ([block_k, block_q] = k @ q^T) so that the
  per-query logsumexp and delta are lane-dense rows.

Causal masking skips fully masked tiles with `pl.when`, and the index maps clamp the block
index of a skipped step to the last (forward, dq) or next (dk/dv) visible block: the TPU
pipeline copies a block only when its index changes, so a skipped step loads nothing (the
same device as the index maps of jax's ops/tpu/flash_attention).

Per-query vectors (logsumexp, delta) live in HBM as [batch, heads, 1, seq] float32 rows and
segment ids as [batch, 1, seq] int32 rows: lane-dense (XLA tiles a [..., seq, 1] column
T(8,128), 128x its size); a kernel that needs a column transposes its [1, block] row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from elmjax.kernels.flash_tiles import (
    MASK_VALUE,
    FlashConfig,
    call_kwargs,
    causal_kv_block_end,
    causal_q_block_start,
    cost_estimate,
    scalar_table_spec,
    split_optional_refs,
    tile_logits,
    visible_tiles,
)

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T


def _scratch(shape):
    """A float32 VMEM scratch buffer (plain memory in interpret mode)."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, jnp.float32)


def _column(row):
    """[1, n] -> [n, 1] (a lane-to-sublane relayout inside the kernel)."""
    return row.T


def _visible(cfg: FlashConfig, q_block, kv_block):
    """Whether tile (q_block, kv_block) has any unmasked causal entry (True if not causal)."""
    if not cfg.causal:
        return True
    return kv_block < causal_kv_block_end(cfg, q_block)


def _kv_block_for(cfg: FlashConfig, q_block, kv_block):
    """The kv block a (q_block, kv_block) step fetches: past the causal end it stays on the
    last visible block, so skipped steps re-use the buffer instead of loading new data."""
    if not cfg.causal:
        return kv_block
    return lax.min(kv_block, causal_kv_block_end(cfg, q_block) - 1)


def _q_block_for(cfg: FlashConfig, kv_block, q_block):
    """The q block a dk/dv step fetches: before the first query block that sees the key
    block it fetches that one (the first step's fetch is then already the one needed)."""
    if not cfg.causal:
        return q_block
    return lax.max(q_block, causal_q_block_start(cfg, kv_block))


def _bytes(*arrays) -> int:
    return sum(x.size * x.dtype.itemsize for x in arrays if x is not None)


# ----------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, *refs, cfg: FlashConfig):
    """One (query block, key block) step of one head.

    Refs: q [block_q, head_dim], k/v [block_k, head_dim]; optional q_seg [1, block_q],
    kv_seg [1, block_k], slopes [heads]; outputs o [block_q, head_dim], lse [1, block_q];
    scratch m, l [block_q, 1], acc [block_q, head_dim].
    """
    q_seg_ref, kv_seg_ref, slopes_ref, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = (
        split_optional_refs(cfg, refs)
    )
    head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_visible(cfg, q_block, kv_block))
    def _step():
        q_seg = _column(q_seg_ref[...]) if cfg.has_segments else None
        kv_seg = kv_seg_ref[...] if cfg.has_segments else None
        slope = slopes_ref[head] if cfg.has_alibi else None
        logits = tile_logits(
            cfg, q_ref[...], k_ref[...], q_block * cfg.block_q, kv_block * cfg.block_k,
            q_seg, kv_seg, slope,
        )
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        correction = jnp.exp(m_prev - m_new)
        p = jnp.exp(logits - m_new)
        v = v_ref[...]
        l_ref[...] = correction * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = correction * acc_ref[...] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        m_ref[...] = m_new

    @pl.when(kv_block == cfg.num_kv_blocks - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
        lse_ref[...] = (m_ref[...] + jnp.log(l)).T


def flash_forward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, slopes):
    """Padded BHSD forward: out [batch, q_heads, q_pad, head_dim] and the logsumexp rows
    [batch, q_heads, 1, q_pad] float32.

    q_seg [batch, q_pad] and kv_seg [batch, kv_pad] int32 or None; slopes [q_heads] or None.
    """
    batch, heads, q_pad, head_dim = q.shape
    bq, bk, groups = cfg.block_q, cfg.block_k, cfg.groups
    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, head_dim),
        lambda b, h, i, j: (b, lax.div(h, groups), _kv_block_for(cfg, i, j), 0),
    )
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
    in_specs, extra = [q_spec, kv_spec, kv_spec], []
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, 1, bq), lambda b, h, i, j: (b, 0, i)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, _kv_block_for(cfg, i, j))),
        ]
        extra += [q_seg[:, None, :], kv_seg[:, None, :]]
    if cfg.has_alibi:
        in_specs.append(scalar_table_spec(cfg))
        extra.append(slopes)
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, 1, q_pad), jnp.float32),
    ]
    # Bytes: q read and out written once, K/V tiles once per visible tile, lse rows.
    kv_tile_bytes = 2 * bk * head_dim * k.dtype.itemsize
    cost = cost_estimate(
        cfg, batch * heads, head_dim, matmuls=2,
        bytes_accessed=2 * _bytes(q)
        + batch * heads * (4 * q_pad + visible_tiles(cfg) * kv_tile_bytes),
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(batch, heads, cfg.num_q_blocks, cfg.num_kv_blocks),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=out_shape,
        scratch_shapes=[_scratch((bq, 1)), _scratch((bq, 1)), _scratch((bq, head_dim))],
        **call_kwargs(cfg, ("parallel", "parallel", "parallel", "arbitrary"),
                      "flash_attention_fwd", cost),
    )(q, k, v, *extra)


# ---------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig):
    """One (query block, key block) step of dq for one head.

    Refs: q/do [block_q, head_dim], k/v [block_k, head_dim], lse/delta [1, block_q];
    optional q_seg [1, block_q], kv_seg [1, block_k], slopes [heads]; output dq
    [block_q, head_dim]; scratch dq_acc [block_q, head_dim].
    """
    q_seg_ref, kv_seg_ref, slopes_ref, (dq_ref, dq_acc_ref) = split_optional_refs(cfg, refs)
    head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    @pl.when(_visible(cfg, q_block, kv_block))
    def _step():
        q_seg = _column(q_seg_ref[...]) if cfg.has_segments else None
        kv_seg = kv_seg_ref[...] if cfg.has_segments else None
        slope = slopes_ref[head] if cfg.has_alibi else None
        k, v = k_ref[...], v_ref[...]
        logits = tile_logits(
            cfg, q_ref[...], k, q_block * cfg.block_q, kv_block * cfg.block_k,
            q_seg, kv_seg, slope,
        )
        p = jnp.exp(logits - _column(lse_ref[...]))  # [block_q, block_k]
        dp = lax.dot_general(do_ref[...], v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _column(delta_ref[...]))
        dq_acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kv_block == cfg.num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig):
    """One (group head, query block) step of dk/dv for one key block of one kv head.

    Refs: q/do [block_q, head_dim] of query head kv_head * groups + g, k/v
    [block_k, head_dim], lse/delta [1, block_q]; optional q_seg [1, block_q],
    kv_seg [1, block_k], slopes [heads]; outputs dk, dv [block_k, head_dim]; scratch
    dk_acc, dv_acc [block_k, head_dim]. Tiles are keys-major: [block_k, block_q].
    """
    q_seg_ref, kv_seg_ref, slopes_ref, (dk_ref, dv_ref, dk_acc_ref, dv_acc_ref) = (
        split_optional_refs(cfg, refs)
    )
    kv_head, kv_block = pl.program_id(1), pl.program_id(2)
    group, q_block = pl.program_id(3), pl.program_id(4)

    @pl.when((group == 0) & (q_block == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when(_visible(cfg, q_block, kv_block))
    def _step():
        q_seg = q_seg_ref[...] if cfg.has_segments else None
        kv_seg = _column(kv_seg_ref[...]) if cfg.has_segments else None
        slope = slopes_ref[kv_head * cfg.groups + group] if cfg.has_alibi else None
        q, do = q_ref[...], do_ref[...]
        logits_t = tile_logits(
            cfg, q, k_ref[...], q_block * cfg.block_q, kv_block * cfg.block_k,
            q_seg, kv_seg, slope, keys_major=True,
        )
        p_t = jnp.exp(logits_t - lse_ref[...])  # [block_k, block_q]
        dv_acc_ref[...] += lax.dot_general(
            p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
        )
        dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_acc_ref[...] += lax.dot_general(
            ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
        )

    @pl.when((group == cfg.groups - 1) & (q_block == cfg.num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def flash_backward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, slopes, out, lse, dout):
    """dq, dk, dv of the padded BHSD attention; arguments as saved by `flash_forward`.

    q/out/dout [batch, q_heads, q_pad, head_dim], k/v [batch, kv_heads, kv_pad, head_dim],
    lse [batch, q_heads, 1, q_pad] float32; q_seg [batch, q_pad], kv_seg [batch, kv_pad]
    int32 or None; slopes [q_heads] float32 or None.
    """
    batch, heads, q_pad, head_dim = q.shape
    kv_heads = k.shape[1]
    bq, bk, groups = cfg.block_q, cfg.block_k, cfg.groups
    # delta = rowsum(dout * out), as lane-dense rows: linear in seq, left to XLA.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    segs = [q_seg[:, None, :], kv_seg[:, None, :]] if cfg.has_segments else []
    extra = segs + ([slopes] if cfg.has_alibi else [])
    q_tile_bytes = bq * head_dim * q.dtype.itemsize
    kv_tile_bytes = bk * head_dim * k.dtype.itemsize
    tiles = batch * heads * visible_tiles(cfg)

    # dq: grid (batch, q head, q block, kv block); kv blocks clamped past the causal end.
    kv_of = lambda i, j: _kv_block_for(cfg, i, j)
    q_rows = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
    q_vec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
    kv_tile = pl.BlockSpec(
        (None, None, bk, head_dim), lambda b, h, i, j: (b, lax.div(h, groups), kv_of(i, j), 0)
    )
    extra_specs = []
    if cfg.has_segments:
        extra_specs += [
            pl.BlockSpec((None, 1, bq), lambda b, h, i, j: (b, 0, i)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_of(i, j))),
        ]
    if cfg.has_alibi:
        extra_specs.append(scalar_table_spec(cfg))
    dq_cost = cost_estimate(
        cfg, batch * heads, head_dim, matmuls=3,
        bytes_accessed=3 * _bytes(q) + 2 * _bytes(lse) + 2 * tiles * kv_tile_bytes,
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(batch, heads, cfg.num_q_blocks, cfg.num_kv_blocks),
        in_specs=[q_rows, kv_tile, kv_tile, q_rows, q_vec, q_vec, *extra_specs],
        out_specs=q_rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[_scratch((bq, head_dim))],
        **call_kwargs(cfg, ("parallel", "parallel", "parallel", "arbitrary"),
                      "flash_attention_dq", dq_cost),
    )(q, k, v, dout, lse, delta, *extra)

    # dk, dv: grid (batch, kv head, kv block, group head, q block); q blocks before the
    # first one that sees the key block are clamped to it.
    q_of = lambda j, i: _q_block_for(cfg, j, i)
    q_head = lambda h, g: h * groups + g
    q_rows = pl.BlockSpec(
        (None, None, bq, head_dim), lambda b, h, j, g, i: (b, q_head(h, g), q_of(j, i), 0)
    )
    q_vec = pl.BlockSpec((None, None, 1, bq), lambda b, h, j, g, i: (b, q_head(h, g), 0, q_of(j, i)))
    kv_tile = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, g, i: (b, h, j, 0))
    extra_specs = []
    if cfg.has_segments:
        extra_specs += [
            pl.BlockSpec((None, 1, bq), lambda b, h, j, g, i: (b, 0, q_of(j, i))),
            pl.BlockSpec((None, 1, bk), lambda b, h, j, g, i: (b, 0, j)),
        ]
    if cfg.has_alibi:
        extra_specs.append(scalar_table_spec(cfg))
    dkv_cost = cost_estimate(
        cfg, batch * heads, head_dim, matmuls=4,
        bytes_accessed=4 * _bytes(k) + tiles * (2 * q_tile_bytes + 8 * bq),
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(batch, kv_heads, cfg.num_kv_blocks, groups, cfg.num_q_blocks),
        in_specs=[q_rows, kv_tile, kv_tile, q_rows, q_vec, q_vec, *extra_specs],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[_scratch((bk, head_dim)), _scratch((bk, head_dim))],
        **call_kwargs(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
                      "flash_attention_dkv", dkv_cost),
    )(q, k, v, dout, lse, delta, *extra)
    return dq, dk, dv
