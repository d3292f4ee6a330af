"""The decoder: embeddings, pre-norm blocks with per-layer shapes, final norm, output head.

The model family (`config.model.family`, elmjax/models/) decides every layer's shapes and
builds each block's parts (norm, attention, feed-forward); this file only assembles them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax import models, mup
from elmjax.layers import adapters
from elmjax.layers import aux as aux_terms
from elmjax.layers.init import materialize, param
from elmjax.layers.linear import Linear
from elmjax.layers.positions import rope_tables
from elmjax.layers.remat import REMAT_POLICIES
from elmjax.layers.scan import plan_for, scan_run
from elmjax.parallel.sharding import constrain


class Block(nnx.Module):
    """`x += attn(attn_norm(x)); x += ffn(ffn_norm(x))`, with parts made by the family."""

    def __init__(self, family, model_config, layer_spec, *, init):
        cfg = model_config
        self.attn_norm = family.norm(cfg, cfg.model_dim)
        self.attn = family.attention(cfg, layer_spec, init)
        self.ffn_norm = family.norm(cfg, cfg.model_dim)
        self.ffn = family.feed_forward(cfg, layer_spec, init)
        self.ffn_has_aux = bool(getattr(self.ffn, "has_aux", False))

    def feed_forward(self, x):
        """(ffn output, aux dict or None)."""
        if self.ffn_has_aux:
            return self.ffn(x)
        return self.ffn(x), None

    def __call__(self, x, rope, segment_ids, cache=None):
        """x [batch, seq, model_dim] -> (x, aux dict or None); with a cache, (x, LayerCache)."""
        if cache is not None:  # decoding: returns (x, updated LayerCache); see layers/kv_cache.py
            attn_out, layer_cache = self.attn(self.attn_norm(x), rope=rope, cache=cache)
            x = x + attn_out
            return x + self.feed_forward(self.ffn_norm(x))[0], layer_cache
        x = x + self.attn(self.attn_norm(x), rope=rope, segment_ids=segment_ids)
        ffn_out, aux = self.feed_forward(self.ffn_norm(x))
        return constrain(x + ffn_out, ("batch", "seq", "embed")), aux


class Transformer(nnx.Module):
    """A decoder-only language model built from a validated `config.model`.

    Layers may differ in shape (OpenELM's layer-wise scaling), so parameters are stored per
    layer; runs of alike layers are scanned in the forward pass (elmjax/layers/scan.py,
    `model.scan_layers`, `model.scan_padding`). Construct it with `build_model` (initialised)
    or `abstract_model` (shapes only): the constructor itself only declares parameters
    (elmjax/layers/init.py).
    """

    def __init__(self, model_config):
        cfg = model_config
        family = models.get(cfg.family)
        self.family = cfg.family
        # Per-layer shapes and the runs of consecutive layers compiled as one scanned body.
        self.plan = plan_for(cfg)
        self.model_dim = cfg.model_dim
        self.head_dim = cfg.head_dim
        self.vocab_size = cfg.vocab_size
        self.rope_theta = cfg.rope_theta
        self.position_encoding = cfg.position_encoding
        self.embedding_scale = cfg.embedding_scale
        self.logit_scale = mup.logit_multiplier(cfg)  # logit_scale, x mup_output_alpha / m under muP
        self.tie_embeddings = cfg.tie_embeddings
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.remat_policy = cfg.remat_policy
        self.logit_chunks = cfg.logit_chunks
        param_dtype = jnp.dtype(cfg.param_dtype)
        init = family.init_rules(cfg)

        self.token_embeddings = param(  # [vocab, model_dim]
            (cfg.vocab_size, cfg.model_dim), param_dtype, ("vocab", "embed"), init.embedding()
        )
        self.layers = nnx.List([Block(family, cfg, spec, init=init) for spec in self.schedule])
        self.norm = family.norm(cfg, cfg.model_dim)
        self.lm_head = (  # untied output projection [model_dim, vocab]; None when tied
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.model_dim, cfg.vocab_size, init=init.output_head(cfg.model_dim),
                logical_axes=("embed", "vocab"), use_bias=False, compute_dtype=self.compute_dtype,
                param_dtype=param_dtype, output_dtype=jnp.float32,  # float32 logits, as the tied head's
            )
        )
        self.embedding_adapter = nnx.data(None)  # LoRA/DoRA on the lookup (adapters.attach)
        adapters.attach(self, cfg)

    @property
    def schedule(self) -> tuple:
        """Per-layer `LayerSpec`s (heads, FFN width), first layer first."""
        return self.plan.schedule

    def embed(self, tokens):
        """tokens [batch, seq] int -> [batch, seq, model_dim] in the compute dtype."""
        table = self.token_embeddings[...]
        h = jnp.take(table, tokens, axis=0)
        if self.embedding_adapter is not None:
            h = self.embedding_adapter.embedding(tokens, table, h.astype(jnp.float32))
        h = h.astype(self.compute_dtype)
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
            logits = self.lm_head(h)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None):
        """Logits for `tokens` (`forward` without the auxiliary terms).

        Args:
          tokens: [batch, seq] int token ids.
          segment_ids: [batch, seq] int document ids of a packed row (0 marks padding); tokens
            attend only within their document. None: the row is one document.
          positions: [batch, seq] int position of each token within its document; default
            0..seq-1. Packed rows restart positions at each document.
          cache: a `kv_cache.KVCache` (decoding, elmjax/inference/generate.py). The tokens are
            written at the cache's next slots and also attend to the cached ones;
            `segment_ids` then marks padding (0) vs real tokens (1) and `positions` must be
            given per row.
        Returns:
          [batch, seq, vocab_size] float32 logits; with a cache, (logits, updated KVCache).
        """
        if cache is not None:
            return self.decode(tokens, cache, segment_ids=segment_ids, positions=positions)
        return self.forward(tokens, segment_ids=segment_ids, positions=positions)[0]

    def forward(self, tokens, *, segment_ids=None, positions=None):
        """(logits [batch, seq, vocab] float32, aux dict) for training; see `__call__` for the
        arguments and elmjax/layers/aux.py for the aux dict (empty for most families)."""
        h, aux = self.hidden(tokens, segment_ids=segment_ids, positions=positions)
        return self.head(h), aux

    def hidden(self, tokens, *, segment_ids=None, positions=None):
        """(final-normed hidden states [batch, seq, model_dim], aux dict): `forward` without
        the output head, for losses that apply the head chunk by chunk."""
        positions = self._positions(tokens, positions)
        h = self.embed(tokens)
        rope = self.rope(positions)
        per_layer = {}
        policy = None if self.remat_policy == "none" else REMAT_POLICIES[self.remat_policy]
        for run in self.plan.runs:
            scanned = None
            if len(run) > 1:
                blocks = [self.layers[i] for i in run]
                scanned = scan_run(blocks, [self.schedule[i].ffn_dim for i in run], h, rope, segment_ids, policy)
            if scanned is not None:
                h, run_aux = scanned
            else:  # one layer, or blocks that differ in structure: unrolled
                run_aux = []
                for index in run:
                    block = self.layers[index]
                    if policy is None:
                        h, layer_aux = block(h, rope, segment_ids)
                    else:
                        h, layer_aux = nnx.remat(Block.__call__, policy=policy)(block, h, rope, segment_ids)
                    run_aux.append(layer_aux)
            for index, layer_aux in zip(run, run_aux):
                if layer_aux is not None:
                    per_layer[index] = layer_aux
        aux = aux_terms.merge_layers(per_layer) if per_layer else aux_terms.empty()
        return self.norm(h), aux

    def decode(self, tokens, cache, *, segment_ids=None, positions=None):
        """(logits, updated KVCache): `tokens` attend to the cache and are written into it."""
        positions = self._positions(tokens, positions)
        h = self.embed(tokens)
        rope = self.rope(positions)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        step = cache.begin(segment_ids)
        layer_caches = []
        for block, layer_cache in zip(self.layers, cache.layers):
            h, layer_cache = block(h, rope, None, cache=(layer_cache, step))
            layer_caches.append(layer_cache)
        return self.head(self.norm(h)), cache.advance(layer_caches, step, tokens.shape[1])

    @staticmethod
    def _positions(tokens, positions):
        if positions is None:
            return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return positions


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


def count_params(model: nnx.Module, variables=nnx.Param) -> int:
    """Number of elements of a (possibly abstract) model's `variables` (an nnx filter;
    default every parameter)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, variables)))
