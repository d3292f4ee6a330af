"""Position encodings: rotary embeddings (RoPE) and ALiBi (slopes and their scaling past
the training context; the bias they add is `elmjax.kernels.reference.alibi_bias`)."""
from __future__ import annotations

import math

import jax.numpy as jnp


def rope_tables(positions, head_dim: int, theta: float):
    """cos and sin tables for `positions` [batch, seq] -> each [batch, seq, head_dim], float32.

    Non-interleaved ("rotate half") layout: frequencies are repeated, not interleaved.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, seq, head_dim]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotates `x` [batch, seq, heads, head_dim] by the tables from `rope_tables`, in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def alibi_slopes(num_heads: int):
    """ALiBi's per-head slopes m_h [num_heads] (Press et al.; SPEC §3).

    For a power of two n: m_h = 2^(-8h/n), h = 1..n. Otherwise the slopes of the nearest
    lower power of two p, then every other slope of the 2p set.
    """
    def power_of_two_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two_slopes(lower)
    if lower != num_heads:
        slopes += power_of_two_slopes(2 * lower)[0::2][: num_heads - lower]
    return jnp.asarray(slopes, dtype=jnp.float32)


def alibi_slope_divisor(key_len, *, factor: float | None = None, train_seq_len: int | None = None):
    """What ALiBi's slopes are divided by for a call attending to `key_len` keys (SPEC §3,
    Hugging Face's BTLM `alibi_scaling`): `factor` when given (fixed linear scaling);
    with `train_seq_len` N, `key_len / N` when key_len > N (dynamic linear scaling), else 1.

    `key_len` is the number of key slots of the call (padding included, as in HF): the
    sequence length in training, cache slots written so far in decoding (a traced int then).
    Returns a Python float when nothing is traced, else a float32 scalar.
    """
    if factor is not None:
        return float(factor)
    if train_seq_len is None:
        return 1.0
    if isinstance(key_len, int):
        return max(key_len / train_seq_len, 1.0)
    return jnp.maximum(jnp.asarray(key_len, jnp.float32) / jnp.float32(train_seq_len), 1.0)


def scaled_alibi_slopes(num_heads: int, key_len, *, factor=None, train_seq_len=None):
    """`alibi_slopes(num_heads)` divided by `alibi_slope_divisor` ([num_heads] float32); the
    slopes are left untouched (bit for bit) when no scaling applies."""
    slopes = alibi_slopes(num_heads)
    divisor = alibi_slope_divisor(key_len, factor=factor, train_seq_len=train_seq_len)
    if isinstance(divisor, float) and divisor == 1.0:
        return slopes
    return slopes / divisor

