"""Running the flash kernel on a sharded batch: one kernel call per shard via shard_map.

XLA cannot partition a Pallas custom call: under `jit` with sharded activations it would
gather q, k and v onto every device and run the whole batch everywhere. Attention is
independent per (batch row, head), so the kernel runs on each device's block instead; the
blocks are those the logical-axis rules give activations elsewhere in the model (batch over
data/fsdp, heads over tensor). Sequence and head_dim must stay whole per device.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from elmjax.parallel.sharding import fit_spec_to_shape, logical_to_spec

Q_AXES = ("batch", "seq", "q_heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


def attention_specs(mesh, rules, q_shape, kv_shape):
    """(q spec, kv spec) for `mesh` and `rules`; raises if the sequence would be split.

    Query and kv heads are split only when the same mesh axes divide both, so each device
    holds whole GQA groups (local query head j still reads local kv head j // groups).
    """
    q_spec = fit_spec_to_shape(logical_to_spec(Q_AXES, rules), q_shape, mesh)
    kv_spec = fit_spec_to_shape(logical_to_spec(KV_AXES, rules), kv_shape, mesh)
    if q_spec[1] is not None or kv_spec[1] is not None:
        raise ValueError(
            f"mesh.rules shard the logical 'seq' axis over {q_spec[1] or kv_spec[1]!r}; the "
            "flash-attention kernel needs whole sequences per device. Map 'seq' to None, or "
            "use model.attention_impl='xla'."
        )
    batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    return PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, heads, None)


def shard_mapped_attention(attend, mesh, rules, query, key, value, segment_ids, alibi_slopes):
    """attend(query, key, value, segment_ids, alibi_slopes) run per shard of `mesh`.

    `attend` takes the local blocks (segment_ids and alibi_slopes may be None) and returns
    the local [batch, seq, q_heads, head_dim] output.
    """
    q_spec, kv_spec = attention_specs(mesh, rules, query.shape, key.shape)
    batch_axes, head_axes = q_spec[0], q_spec[2]
    args, specs = [query, key, value], [q_spec, kv_spec, kv_spec]
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(PartitionSpec(batch_axes, None))
    if alibi_slopes is not None:
        args.append(alibi_slopes)
        specs.append(PartitionSpec(head_axes))

    def local(q, k, v, *rest):
        rest = list(rest)
        seg = rest.pop(0) if segment_ids is not None else None
        slopes = rest.pop(0) if alibi_slopes is not None else None
        return attend(q, k, v, seg, slopes)

    # check_vma=False: pallas_call does not track varying manual axes.
    return jax.shard_map(
        local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False
    )(*args)
