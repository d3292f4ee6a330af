"""A key/value cache for decoding: one buffer per layer, since head counts differ by layer.

Layout. Every row of the batch shares one slot axis `[0, max_len)`; a call to the model with
a cache writes its `q_len` new tokens at slots `[index, index + q_len)` of every row and then
advances `index`. Prompts of different lengths are LEFT-padded to a common length, so all rows
write the same slots at every step (one `dynamic_update_slice`, no per-row scatter). Padding
slots are marked by `kv_segment_ids == 0` and are never attended; positions (RoPE) are passed
per row by the caller, so a row's first real token is at position 0 whatever its padding.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from elmjax.kernels import reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's keys and values, each [batch, max_len, kv_heads, head_dim]."""

    key: jax.Array
    value: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CacheStep:
    """What every layer needs to know about the tokens of the current call.

    index: [] int32, the first slot this call writes.
    kv_segment_ids: [batch, max_len] int32, 1 where a slot holds a real token (including the
      tokens of this call), 0 for padding and not-yet-written slots.
    """

    index: jax.Array
    kv_segment_ids: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """The whole model's cache: per-layer buffers plus the shared slot bookkeeping."""

    layers: tuple[LayerCache, ...]
    kv_segment_ids: jax.Array  # [batch, max_len] int32, see CacheStep
    index: jax.Array  # [] int32, next slot to write

    @property
    def max_len(self) -> int:
        return self.kv_segment_ids.shape[1]

    def begin(self, segment_ids) -> CacheStep:
        """The step for a call whose tokens have `segment_ids` [batch, q_len] (0 = padding)."""
        written = (segment_ids != 0).astype(jnp.int32)
        kv_segment_ids = jax.lax.dynamic_update_slice(self.kv_segment_ids, written, (0, self.index))
        return CacheStep(index=self.index, kv_segment_ids=kv_segment_ids)

    def advance(self, layers, step: CacheStep, q_len: int) -> "KVCache":
        """The cache after a call wrote `q_len` tokens with `step` into `layers`."""
        return KVCache(tuple(layers), step.kv_segment_ids, step.index + q_len)


def init_cache(schedule, batch: int, max_len: int, head_dim: int, dtype) -> KVCache:
    """An empty cache for a model whose per-layer shapes are `schedule` (scaling.py).

    Layer i's buffers are [batch, max_len, schedule[i].num_kv_heads, head_dim] in `dtype`.
    """
    layers = tuple(
        LayerCache(
            key=jnp.zeros((batch, max_len, layer.num_kv_heads, head_dim), dtype),
            value=jnp.zeros((batch, max_len, layer.num_kv_heads, head_dim), dtype),
        )
        for layer in schedule
    )
    return KVCache(layers, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def attend(layer: LayerCache, step: CacheStep, query, key, value, *, alibi_slopes=None, scale: float):
    """Writes this call's `key`/`value` into `layer` and attends `query` to the whole buffer.

    Args:
      layer: the layer's cache before this call.
      step: slot bookkeeping from `KVCache.begin`.
      query: [batch, q_len, q_heads, head_dim]; query i sits at slot `step.index + i`.
      key, value: [batch, q_len, kv_heads, head_dim], the new tokens' keys and values.
    Returns:
      ([batch, q_len, q_heads, head_dim] in the query's dtype, the updated LayerCache).
    A query sees slots at or before its own that hold real tokens. Query head j reads kv head
    j // (q_heads / kv_heads), as in training (kernels/reference.py).
    """
    start = (0, step.index, 0, 0)
    keys = jax.lax.dynamic_update_slice(layer.key, key.astype(layer.key.dtype), start)
    values = jax.lax.dynamic_update_slice(layer.value, value.astype(layer.value.dtype), start)
    q_slot = step.index + jnp.arange(query.shape[1])  # [q_len]
    kv_slot = jnp.arange(keys.shape[1])  # [max_len]
    # Slot distance equals position distance within a row (padding only shifts both), so the
    # slots serve as ALiBi indices.
    visible = (kv_slot[None, None, :] <= q_slot[None, :, None]) & (
        step.kv_segment_ids[:, None, :] != 0
    )  # [batch, q_len, max_len]
    out = reference.masked_attention(
        query, keys.astype(query.dtype), values.astype(query.dtype), visible,
        q_index=q_slot, kv_index=kv_slot, alibi_slopes=alibi_slopes, scale=scale,
    )
    return out, LayerCache(keys, values)
