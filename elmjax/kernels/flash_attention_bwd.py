"""Backward kernels of flash attention: dq, and dk/dv (summed over each kv head's group).

Both recompute the probabilities of a tile from the forward's saved logsumexp:
`p = exp(logits - lse)`, then with `delta = rowsum(dout * out)`:
`ds = p * (dout @ v^T - delta)`, `dq = scale * ds @ k`, `dk = scale * ds^T @ q`,
`dv = p^T @ dout`. Nothing of size seq x seq is ever formed; tiles are
[block_q, block_k] and accumulate in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from elmjax.kernels.flash_tiles import (
    FlashConfig,
    call_kwargs,
    causal_kv_block_end,
    causal_q_block_start,
    cost_estimate,
    scalar_table_spec,
    split_optional_refs,
    tile_logits,
)

# dot_general dimension numbers: contract rows of both operands (a^T @ b), and a @ b^T.
_TN = (((0,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig):
    """One query block of one head: loops over the key blocks it can see.

    Refs: q/do [block_q, head_dim], k/v [kv_pad, head_dim] (this head's kv head),
    lse/delta [block_q, 1]; optional q_seg [block_q, 1], kv_seg [1, kv_pad], slopes [heads];
    output dq [block_q, head_dim].
    """
    q_seg_ref, kv_seg_ref, slopes_ref, (dq_ref,) = split_optional_refs(cfg, refs)
    q_block = pl.program_id(2)
    q_start = q_block * cfg.block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if cfg.has_segments else None
    slope = slopes_ref[pl.program_id(1)] if cfg.has_alibi else None

    def body(kv_block, dq):
        k_start = pl.multiple_of(kv_block * cfg.block_k, cfg.block_k)
        k = k_ref[pl.ds(k_start, cfg.block_k), :]
        v = v_ref[pl.ds(k_start, cfg.block_k), :]
        kv_seg = kv_seg_ref[:, pl.ds(k_start, cfg.block_k)] if cfg.has_segments else None
        logits = tile_logits(cfg, q, k, q_start, k_start, q_seg, kv_seg, slope)
        p = jnp.exp(logits - lse)  # [block_q, block_k]
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, causal_kv_block_end(cfg, q_block), body, dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig):
    """One key block of one kv head: loops over the group's query heads and query blocks.

    Refs: q/do [groups, q_pad, head_dim] (the query heads that share this kv head),
    k/v [block_k, head_dim], lse/delta [groups, q_pad, 1]; optional q_seg [q_pad, 1],
    kv_seg [1, block_k], slopes [heads]; outputs dk, dv [block_k, head_dim]. Summing over
    the group here is what makes dk/dv of a shared kv head correct for GQA.
    """
    q_seg_ref, kv_seg_ref, slopes_ref, (dk_ref, dv_ref) = split_optional_refs(cfg, refs)
    kv_head, kv_block = pl.program_id(1), pl.program_id(2)
    k_start = kv_block * cfg.block_k
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if cfg.has_segments else None
    first_q_block = causal_q_block_start(cfg, kv_block)

    def head_body(g, carry):
        slope = slopes_ref[kv_head * cfg.groups + g] if cfg.has_alibi else None

        def q_body(q_block, carry):
            dk, dv = carry
            q_start = pl.multiple_of(q_block * cfg.block_q, cfg.block_q)
            rows = pl.ds(q_start, cfg.block_q)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            lse, delta = lse_ref[g, rows, :], delta_ref[g, rows, :]
            q_seg = q_seg_ref[rows, :] if cfg.has_segments else None
            logits = tile_logits(cfg, q, k, q_start, k_start, q_seg, kv_seg, slope)
            p = jnp.exp(logits - lse)  # [block_q, block_k]
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta)
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
            return dk, dv

        return lax.fori_loop(first_q_block, cfg.num_q_blocks, q_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, head_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, slopes, out, lse, dout):
    """dq, dk, dv of the padded BHSD attention; arguments as saved by the forward.

    q/out/dout [batch, q_heads, q_pad, head_dim], k/v [batch, kv_heads, kv_pad, head_dim],
    lse [batch, q_heads, q_pad, 1] float32; q_seg [batch, q_pad], kv_seg [batch, kv_pad]
    int32 or None; slopes [q_heads] float32 or None.
    """
    batch, heads, q_pad, head_dim = q.shape
    kv_heads = k.shape[1]
    # delta = rowsum(dout * out): [batch, q_heads, q_pad, 1], linear in seq, left to XLA.
    delta = jnp.sum(
        dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True
    )
    bq, bk, kv_pad, groups = cfg.block_q, cfg.block_k, cfg.kv_pad, cfg.groups
    segs = [q_seg[:, :, None], kv_seg[:, None, :]] if cfg.has_segments else []
    extra = segs + ([slopes] if cfg.has_alibi else [])
    q_bytes, kv_bytes = q.size * q.dtype.itemsize, k.size * k.dtype.itemsize

    # dq: grid over (batch, query head, query block).
    row_block = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0))
    col_block = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    kv_full = pl.BlockSpec((None, None, kv_pad, head_dim), lambda b, h, i: (b, lax.div(h, groups), 0, 0))
    extra_specs = []
    if cfg.has_segments:
        extra_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, kv_pad), lambda b, h, i: (b, 0, 0)),
        ]
    if cfg.has_alibi:
        extra_specs.append(scalar_table_spec(cfg))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(batch, heads, cfg.num_q_blocks),
        in_specs=[row_block, kv_full, kv_full, row_block, col_block, col_block, *extra_specs],
        out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **call_kwargs(cfg, 3, "flash_attention_dq", cost_estimate(
            cfg, batch * heads, head_dim, matmuls=3,
            bytes_accessed=3 * q_bytes + 2 * kv_bytes * groups,
        )),
    )(q, k, v, dout, lse, delta, *extra)

    # dk, dv: grid over (batch, kv head, key block); the kv head's query heads are one block.
    group_rows = pl.BlockSpec((None, groups, q_pad, head_dim), lambda b, h, j: (b, h, 0, 0))
    group_cols = pl.BlockSpec((None, groups, q_pad, 1), lambda b, h, j: (b, h, 0, 0))
    kv_block = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j: (b, h, j, 0))
    extra_specs = []
    if cfg.has_segments:
        extra_specs += [
            pl.BlockSpec((None, q_pad, 1), lambda b, h, j: (b, 0, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j)),
        ]
    if cfg.has_alibi:
        extra_specs.append(scalar_table_spec(cfg))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(batch, kv_heads, cfg.num_kv_blocks),
        in_specs=[group_rows, kv_block, kv_block, group_rows, group_cols, group_cols, *extra_specs],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **call_kwargs(cfg, 3, "flash_attention_dkv", cost_estimate(
            cfg, batch * heads, head_dim, matmuls=4, bytes_accessed=2 * q_bytes + 4 * kv_bytes,
        )),
    )(q, k, v, dout, lse, delta, *extra)
    return dq, dk, dv
