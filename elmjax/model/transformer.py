"""The decoder: embeddings, pre-norm blocks with per-layer shapes, final norm, tied head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.model.attention import Attention
from elmjax.model.init import make_init, normal, param
from elmjax.model.linear import Linear
from elmjax.model.mlp import SwiGLU
from elmjax.model.norms import make_norm
from elmjax.model.positions import rope_tables
from elmjax.scaling import schedule_from_config
from elmjax.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class Block(nnx.Module):
    """`x += attn(attn_norm(x)); x += ffn(ffn_norm(x))`."""

    def __init__(self, model_config, layer_spec, *, init, rngs):
        cfg = model_config
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.attn_norm = make_norm(cfg.norm_type, cfg.model_dim, cfg.norm_eps, cfg.use_bias, param_dtype)
        self.attn = Attention(cfg, layer_spec.num_query_heads, layer_spec.num_kv_heads, init=init, rngs=rngs)
        self.ffn_norm = make_norm(cfg.norm_type, cfg.model_dim, cfg.norm_eps, cfg.use_bias, param_dtype)
        self.ffn = SwiGLU(
            cfg.model_dim, layer_spec.ffn_dim, init=init, use_bias=cfg.use_bias,
            compute_dtype=jnp.dtype(cfg.compute_dtype), param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x, rope, segment_ids):
        x = x + self.attn(self.attn_norm(x), rope=rope, segment_ids=segment_ids)
        x = x + self.ffn(self.ffn_norm(x))
        return constrain(x, ("batch", "seq", "embed"))


class Transformer(nnx.Module):
    """A decoder-only language model built from a validated `config.model`.

    Layers have different shapes (layer-wise scaling), so they are a list, not a scan.
    """

    def __init__(self, model_config, *, rngs: nnx.Rngs):
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

        self.token_embeddings = param(
            normal(rngs.params(), (cfg.vocab_size, cfg.model_dim), init.embedding_std(), param_dtype),
            ("vocab", "embed"),
        )
        self.layers = nnx.List([Block(cfg, spec, init=init, rngs=rngs) for spec in self.schedule])
        self.norm = make_norm(cfg.norm_type, cfg.model_dim, cfg.norm_eps, cfg.use_bias, param_dtype)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = Linear(
                cfg.model_dim, cfg.vocab_size, std=init.linear_std(cfg.model_dim),
                logical_axes=("embed", "vocab"), use_bias=False, compute_dtype=self.compute_dtype,
                param_dtype=param_dtype, rngs=rngs,
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

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        """Logits for `tokens`.

        Args:
          tokens: [batch, seq] int token ids.
          segment_ids: [batch, seq] int document ids of a packed row (0 marks padding); tokens
            attend only within their document. None: the row is one document.
          positions: [batch, seq] int position of each token within its document; default
            0..seq-1. Packed rows restart positions at each document.
        Returns:
          [batch, seq, vocab_size] float32 logits.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = self.embed(tokens)
        rope = self.rope(positions)
        for block in self.layers:
            if self.remat_policy == "none":
                h = block(h, rope, segment_ids)
            else:
                h = nnx.remat(Block.__call__, policy=REMAT_POLICIES[self.remat_policy])(
                    block, h, rope, segment_ids
                )
        return self.head(self.norm(h))


def build_model(model_config, seed: int = 0) -> Transformer:
    """A freshly initialised `Transformer` for `model_config` (parameters from `seed`)."""
    return Transformer(model_config, rngs=nnx.Rngs(params=seed))


def abstract_model(model_config) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` parameters; nothing is allocated."""
    return nnx.eval_shape(lambda: build_model(model_config))


def count_params(model: nnx.Module) -> int:
    """Number of parameter elements of a (possibly abstract) model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
