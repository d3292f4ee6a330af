"""Multi-head attention with a fused q|k|v projection, QK-norm, RoPE or ALiBi, and GQA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from elmjax import mup
from elmjax.kernels import reference
from elmjax.layers import kv_cache
from elmjax.layers.linear import Linear
from elmjax.layers.norms import make_norm
from elmjax.layers.positions import apply_rope, scaled_alibi_slopes
from elmjax.parallel import sharding
from elmjax.parallel.sharding import constrain


def dot_product_attention(
    query,
    key,
    value,
    *,
    impl: str = "xla",
    segment_ids=None,
    causal: bool = True,
    alibi_slopes=None,
    scale: float | None = None,
):
    """The one attention entry point of the model; `impl` picks the implementation.

    Shapes as in `elmjax.kernels.reference.attention`: query [batch, seq, q_heads, head_dim],
    key/value [batch, seq, kv_heads, head_dim]. `impl` is `model.attention_impl`:
    `xla` (plain JAX, materialises seq x seq logits), `pallas` (the flash-attention kernel;
    interpreted on CPU), `cudnn` (`jax.nn.dot_product_attention` on a CUDA GPU: no segment
    ids, no ALiBi, 16-bit inputs), `auto` (pallas on GPU/TPU, xla on CPU). A combination an
    implementation cannot run raises ValueError; nothing falls back silently.
    """
    # The platform the step is compiled for: the active mesh's devices (a TPU dry run compiles
    # for TPU devices from a CPU host), else jax's default backend.
    active = sharding.active_rules()
    platform = active[0].devices.flat[0].platform if active is not None else jax.default_backend()
    if impl == "auto":
        impl = "xla" if platform == "cpu" else "pallas"
    if impl == "xla":
        return reference.attention(
            query, key, value, segment_ids=segment_ids, causal=causal,
            alibi_slopes=alibi_slopes, scale=scale,
        )
    if impl == "pallas":
        from elmjax.kernels.flash_attention import flash_attention
        from elmjax.kernels.flash_sharded import shard_mapped_attention
        from elmjax.kernels.flash_tiles import default_backend

        backend = default_backend(platform)

        def attend(q, k, v, seg, slopes):
            return flash_attention(
                q, k, v, segment_ids=seg, causal=causal, alibi_slopes=slopes, scale=scale, backend=backend
            )

        # Under sharding rules (the train step) the kernel runs per shard: XLA cannot
        # partition a Pallas call.
        if active is None:
            return attend(query, key, value, segment_ids, alibi_slopes)
        mesh, rules = active
        return shard_mapped_attention(
            attend, mesh, rules, query, key, value, segment_ids, alibi_slopes
        )
    if impl == "cudnn":
        problems = []
        if platform not in ("gpu", "cuda"):
            problems.append(f"it needs a CUDA GPU (the platform is {platform!r})")
        if query.dtype not in (jnp.bfloat16, jnp.float16):
            problems.append(f"it needs bfloat16/float16 inputs (got {query.dtype})")
        if segment_ids is not None:
            problems.append("it has no segment ids (packed documents)")
        if alibi_slopes is not None:
            problems.append("it has no ALiBi")
        if problems:
            raise ValueError(
                "model.attention_impl='cudnn' cannot run this attention: "
                + "; ".join(problems) + ". Use attention_impl='pallas' or 'xla'."
            )
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, is_causal=causal, implementation="cudnn"
        )
    raise ValueError(
        f"model.attention_impl={impl!r} is not an attention implementation; "
        "allowed: auto, xla, pallas, cudnn"
    )


class Attention(nnx.Module):
    """One layer's attention: `out_proj(attend(rope(norm(q)), rope(norm(k)), v))`.

    The fused `qkv_proj` output is viewed as [batch, seq, q_heads + 2 * kv_heads, head_dim]
    and split along heads in the order [q | k | v] (SPEC §1).
    """

    def __init__(self, model_config, num_query_heads: int, num_kv_heads: int, *, init):
        cfg = model_config
        self.num_query_heads = num_query_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = cfg.head_dim
        self.qk_norm = cfg.qk_norm
        self.position_encoding = cfg.position_encoding
        self.impl = cfg.attention_impl
        self.scale = mup.attention_scale(cfg)  # 1/sqrt(head_dim), 1/head_dim under muP, or as set
        self.alibi_factor = cfg.alibi_scaling_factor
        self.alibi_train_seq_len = cfg.alibi_train_seq_len
        compute_dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        common = dict(use_bias=cfg.use_bias, compute_dtype=compute_dtype, param_dtype=param_dtype)
        qkv_features = (num_query_heads + 2 * num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.model_dim, qkv_features, init=init.linear(cfg.model_dim),
            logical_axes=("embed", "heads"), **common,
        )
        self.out_proj = Linear(
            num_query_heads * cfg.head_dim, cfg.model_dim, init=init.output_projection(),
            logical_axes=("heads", "embed"), **common,
        )
        norm_args = (cfg.norm_type,)
        if cfg.qk_norm == "per_head":  # one weight of size head_dim, shared by the heads
            self.q_norm = make_norm(*norm_args, cfg.head_dim, cfg.norm_eps, False, param_dtype)
            self.k_norm = make_norm(*norm_args, cfg.head_dim, cfg.norm_eps, False, param_dtype)
        elif cfg.qk_norm == "full":  # over the whole projected q and k (OLMoE)
            self.q_norm = make_norm(*norm_args, num_query_heads * cfg.head_dim, cfg.norm_eps, False, param_dtype)
            self.k_norm = make_norm(*norm_args, num_kv_heads * cfg.head_dim, cfg.norm_eps, False, param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x, rope):
        """q [batch, seq, q_heads, head_dim] and k, v [batch, seq, kv_heads, head_dim]."""
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x).reshape(
            batch, seq, self.num_query_heads + 2 * self.num_kv_heads, self.head_dim
        )
        query = qkv[:, :, : self.num_query_heads]
        key = qkv[:, :, self.num_query_heads : self.num_query_heads + self.num_kv_heads]
        value = qkv[:, :, self.num_query_heads + self.num_kv_heads :]
        if self.qk_norm == "per_head":
            query, key = self.q_norm(query), self.k_norm(key)
        elif self.qk_norm == "full":
            query = self.q_norm(query.reshape(batch, seq, -1)).reshape(query.shape)
            key = self.k_norm(key.reshape(batch, seq, -1)).reshape(key.shape)
        if self.position_encoding == "rope":
            cos, sin = rope
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        query = constrain(query, ("batch", "seq", "q_heads", "head_dim"))
        key = constrain(key, ("batch", "seq", "kv_heads", "head_dim"))
        value = constrain(value, ("batch", "seq", "kv_heads", "head_dim"))
        return query, key, value

    def alibi(self, key_len):
        """Per-head ALiBi slopes [q_heads] for a call attending to `key_len` key slots (scaled
        by `model.alibi_scaling_factor` / `alibi_train_seq_len`), or None with RoPE."""
        if self.position_encoding != "alibi":
            return None
        return scaled_alibi_slopes(
            self.num_query_heads, key_len, factor=self.alibi_factor, train_seq_len=self.alibi_train_seq_len
        )

    def __call__(self, x, *, rope, segment_ids=None, cache=None):
        """x [batch, seq, model_dim] -> [batch, seq, model_dim].

        With `cache=(LayerCache, CacheStep)` (decoding, model/kv_cache.py) the new keys and
        values are written into the cache, queries also see the cached ones, and the result
        is `(output, updated LayerCache)`.
        """
        query, key, value = self.project(x, rope)
        batch, seq = x.shape[:2]
        if cache is not None:
            layer_cache, step = cache
            # Keys seen by this call: every slot written so far (as HF's BTLM counts them).
            slopes = self.alibi(step.index + seq)
            out, layer_cache = kv_cache.attend(
                layer_cache, step, query, key, value, alibi_slopes=slopes, scale=self.scale
            )
            return self.out_proj(out.reshape(batch, seq, self.num_query_heads * self.head_dim)), layer_cache
        out = dot_product_attention(
            query, key, value, impl=self.impl, segment_ids=segment_ids, causal=True,
            alibi_slopes=self.alibi(seq), scale=self.scale,
        )  # [batch, seq, q_heads, head_dim]
        out = checkpoint_name(out, "attention_out")  # kept by remat_policy=save_attention_out
        return self.out_proj(out.reshape(batch, seq, self.num_query_heads * self.head_dim))
