"""Plain-JAX attention: the oracle for the Pallas kernel and the CPU path (`xla`).

It materialises the [query, key] logits, so its memory grows with seq^2; the Pallas kernel
(flash_attention.py) is the memory-linear path on GPU/TPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Large but finite, so fully masked rows (padding) give a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_len: int, kv_len: int, *, causal: bool, q_segment_ids=None, kv_segment_ids=None):
    """Boolean mask [batch or 1, q_len, kv_len]: True where a query may attend to a key.

    Causal masking is aligned to the end (query i sits at key position kv_len - q_len + i), so
    the same mask serves training (q_len == kv_len) and decoding with a cache.
    """
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        q_index = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        mask = mask & (q_index >= jnp.arange(kv_len)[None, :])[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def alibi_bias(slopes, q_index, kv_index):
    """ALiBi's additive attention bias [heads, q_len, kv_len] (float32):
    `-slope_h * (q_index_i - kv_index_j)`.

    slopes: [heads]; q_index [q_len] and kv_index [kv_len]: the sequence positions of queries
    and keys. Causal attention only uses j <= i, where this equals the original
    `-slope * |i - j|`.
    """
    distance = (q_index[:, None] - kv_index[None, :]).astype(jnp.float32)  # [q_len, kv_len]
    return -slopes.astype(jnp.float32)[:, None, None] * distance[None]


def masked_attention(query, key, value, mask, *, q_index, kv_index, alibi_slopes=None, scale=None):
    """Grouped-query softmax attention under an explicit mask: the core of both training
    attention (`attention`) and cached decoding (elmjax/layers/kv_cache.py).

    Args:
      query: [batch, q_len, num_query_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim]; num_kv_heads divides
        num_query_heads, and query head j reads kv head j // (num_query_heads / num_kv_heads).
        Keys are never repeated in memory: queries are grouped per kv head instead.
      mask: bool [batch or 1, q_len, kv_len], True where a query may attend to a key.
      q_index, kv_index: int [q_len], [kv_len] sequence indices, for ALiBi distances.
      alibi_slopes: [num_query_heads] float32; adds -slope * (q_index - kv_index).
      scale: logit scale; default 1/sqrt(head_dim).
    Returns:
      [batch, q_len, num_query_heads, head_dim] in the query's dtype.
    """
    batch, q_len, num_query_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    if num_query_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} must divide num_query_heads={num_query_heads}"
        )
    groups = num_query_heads // num_kv_heads
    if scale is None:
        scale = head_dim**-0.5
    grouped = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    # [batch, kv_heads, groups, q_len, kv_len]
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, key, preferred_element_type=jnp.float32)
    logits = logits * scale
    if alibi_slopes is not None:  # [q_heads, q, k] -> grouped like the logits
        bias = alibi_bias(alibi_slopes, q_index, kv_index)
        logits = logits + bias.reshape(num_kv_heads, groups, *bias.shape[1:])[None]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_query_heads, head_dim).astype(query.dtype)


def attention(
    query,
    key,
    value,
    *,
    segment_ids=None,
    kv_segment_ids=None,
    causal: bool = True,
    alibi_slopes=None,
    scale: float | None = None,
):
    """Softmax attention with GQA, causal and document masking, and optional ALiBi.

    Args:
      query: [batch, q_len, num_query_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim] (see `masked_attention` for GQA).
      segment_ids: [batch, q_len] int document ids; a query attends only to keys of the same
        id (packed rows). `kv_segment_ids` [batch, kv_len] defaults to `segment_ids`.
      causal: mask keys after the query (aligned to the end when q_len < kv_len).
      alibi_slopes: [num_query_heads] float32; adds -slope * (q_pos - k_pos) to the logits.
      scale: logit scale; default 1/sqrt(head_dim).
    Returns:
      [batch, q_len, num_query_heads, head_dim] in the query's dtype.
    """
    q_len, kv_len = query.shape[1], key.shape[1]
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    mask = attention_mask(
        q_len, kv_len, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
    )
    return masked_attention(
        query, key, value, mask, q_index=jnp.arange(q_len) + (kv_len - q_len),
        kv_index=jnp.arange(kv_len), alibi_slopes=alibi_slopes, scale=scale,
    )
