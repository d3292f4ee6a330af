"""The decoder: embeddings, pre-norm blocks with per-layer shapes, final norm, tied head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.layers.attention import Attention
from elmjax.layers.init import make_init, materialize, param
from elmjax.layers.linear import Linear
from elmjax.layers.mlp import SwiGLU
from elmjax.layers.norms import make_norm
from elmjax.layers.positions import rope_tables
from elmjax.models.openelm.layerwise import schedule_from_config
from elmjax.parallel.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class Block(nnx.Module):
    """`x += attn(attn_norm(x)); x += ffn(ffn_norm(x))`."""

    def __init__(self, model_config, layer_spec, *, init):
        cfg = model_config
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.attn_norm = make_norm(cfg.norm_type, cfg.model_dim, cfg.norm_eps, cfg.use_bias, param_dtype)
        self.attn = Attention(cfg, layer_spec.num_query_heads, layer_spec.num_kv_heads, init=init)
        self.ffn_norm = make_norm(cfg.norm_type, cfg.model_dim, cfg.norm_eps, cfg.use_bias, param_dtype)
        self.ffn = SwiGLU(
            cfg.model_dim, layer_spec.ffn_dim, init=init, use_bias=cfg.use_bias,
            compute_dtype=jnp.dtype(cfg.compute_dtype), param_dtype=param_dtype,
        )

    def __call__(self, x, rope, segment_ids, cache=None):
        if cache is not None:  # decoding: returns (x, updated LayerCache); see model/kv_cache.py
            attn_out, layer_cache = self.attn(self.attn_norm(x), rope=rope, cache=cache)
            x = x + attn_out
            return x + self.ffn(self.ffn_norm(x)), layer_cache
        x = x + self.attn(self.attn_norm(x), rope=rope, segment_ids=segment_ids)
        x = x + self.ffn(self.ffn_norm(x))
        return constrain(x, ("batch", "seq", "embed"))


class Transformer(nnx.Module):
    """A decoder-only language model built from a validated `config.model`.

    Layers have different shapes (layer-wise scaling), so they are a list, not a scan.
    Construct it with `build_model` (initialised) or `abstract_model` (shapes only): the
    constructor itself only declares parameters (elmjax/layers/init.py).
    """

    def __init__(self, model_config):
        cfg = model_config
        self.schedule = tuple(schedule_from_config(cfg))
        self.model_dim = cfg.model_dim
        self.head_dim = cfg.head_dim
        self.vocab_size = cfg.vocab_size
        self.rope_theta = cfg.rope_theta
        self.position_encoding = cfg.position_encoding
        self.embedding_scale = cfg.embedding_scale
        self.logit_scale = cfg.logit_scale
        self.tie_embeddings = cfg.tie_embeddings
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.remat_policy = cfg.remat_policy
        param_dtype = jnp.dtype(cfg.param_dtype)
        init = make_init(cfg.init_scheme, cfg.model_dim, cfg.num_layers)

        self.token_embeddings = param(  # [vocab, model_dim]
            (cfg.vocab_size, cfg.model_dim), param_dtype, ("vocab", "embed"), init.embedding()
        )
        self.layers = nnx.List([Block(cfg, spec, init=init) for spec in self.schedule])
        self.norm = make_norm(cfg.norm_type, cfg.model_dim, cfg.norm_eps, cfg.use_bias, param_dtype)
        self.lm_head = (  # untied output projection [model_dim, vocab]; None when tied
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.model_dim, cfg.vocab_size, init=init.linear(cfg.model_dim),
                logical_axes=("embed", "vocab"), use_bias=False, compute_dtype=self.compute_dtype,
                param_dtype=param_dtype,
            )
        )

    def embed(self, tokens):
        """tokens [batch, seq] int -> [batch, seq, model_dim] in the compute dtype."""
        h = jnp.take(self.token_embeddings[...], tokens, axis=0).astype(self.compute_dtype)
        if self.embedding_scale != 1.0:
            h = h * self.embedding_scale
        return constrain(h, ("batch", "seq", "embed"))

    def rope(self, positions):
        """RoPE tables for positions [batch, seq], or None for ALiBi models."""
        if self.position_encoding != "rope":
            return None
        return rope_tables(positions, self.head_dim, self.rope_theta)

    def head(self, h):
        """Final hidden states [batch, seq, model_dim] -> float32 logits [batch, seq, vocab]."""
        if self.tie_embeddings:
            embedding = self.token_embeddings[...].astype(self.compute_dtype)
            logits = jnp.einsum("bsd,vd->bsv", h, embedding, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(h).astype(jnp.float32)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None):
        """Logits for `tokens`.

        Args:
          tokens: [batch, seq] int token ids.
          segment_ids: [batch, seq] int document ids of a packed row (0 marks padding); tokens
            attend only within their document. None: the row is one document.
          positions: [batch, seq] int position of each token within its document; default
            0..seq-1. Packed rows restart positions at each document.
          cache: a `kv_cache.KVCache` (decoding, elmjax/inference/generate.py). The tokens are written at
            the cache's next slots and also attend to the cached ones; `segment_ids` then
            marks padding (0) vs real tokens (1) and `positions` must be given per row.
        Returns:
          [batch, seq, vocab_size] float32 logits; with a cache, (logits, updated KVCache).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = self.embed(tokens)
        rope = self.rope(positions)
        if cache is not None:
            if segment_ids is None:
                segment_ids = jnp.ones(tokens.shape, jnp.int32)
            step = cache.begin(segment_ids)
            layer_caches = []
            for block, layer_cache in zip(self.layers, cache.layers):
                h, layer_cache = block(h, rope, None, cache=(layer_cache, step))
                layer_caches.append(layer_cache)
            return self.head(self.norm(h)), cache.advance(layer_caches, step, tokens.shape[1])
        for block in self.layers:
            if self.remat_policy == "none":
                h = block(h, rope, segment_ids)
            else:
                h = nnx.remat(Block.__call__, policy=REMAT_POLICIES[self.remat_policy])(
                    block, h, rope, segment_ids
                )
        return self.head(self.norm(h))


def abstract_model(model_config) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` parameters; nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(model_config))


def build_model(model_config, seed: int = 0, param_sharding=None) -> Transformer:
    """A freshly initialised `Transformer` for `model_config`.

    Args:
      seed: initialisation seed; the same seed gives the same weights on any mesh.
      param_sharding: optional `fn(logical_axes) -> jax.sharding.Sharding` placing each
        parameter (see `elmjax.layers.init.materialize`).
    """
    return materialize(abstract_model(model_config), seed, param_sharding)


def count_params(model: nnx.Module) -> int:
    """Number of parameter elements of a (possibly abstract) model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
