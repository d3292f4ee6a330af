"""Shared builders for model tests: scaled-down OpenELM variants and an mlx-lm twin."""
import numpy as np

from elmjax.config import openelm_config, validate
from elmjax.convert.hf import hf_config, to_hf_state_dict
from elmjax.layers.decoder import build_model

# (layers, model_dim, head_dim, ffn_dim_divisor) of each variant, and a shrink factor. Dividing
# model_dim, head_dim and the divisor by the same factor keeps make_divisible's rounding
# points, so the scaled model has exactly the variant's per-layer head counts.
VARIANTS = {
    "270m": (16, 1280, 64, 256, 4),
    "450m": (20, 1536, 64, 256, 4),
    "1_1b": (28, 2048, 64, 256, 4),
    "3b": (36, 3072, 128, 256, 8),
}


def scaled_variant_config(variant: str, vocab_size: int = 512, **model_overrides):
    """A small config with the variant's layer count and per-layer head schedule."""
    layers, dim, head_dim, divisor, shrink = VARIANTS[variant]
    config = openelm_config(
        num_layers=layers, model_dim=dim // shrink, head_dim=head_dim // shrink, peak_lr=1e-3,
        ffn_dim_divisor=divisor // shrink, vocab_size=vocab_size, **model_overrides,
    )
    return validate(config)


def mlx_twin(model, model_config):
    """mlx-lm's own `openelm` model holding the same weights as the elmjax `model`."""
    import mlx.core as mx
    from mlx_lm.models import openelm

    args = openelm.ModelArgs.from_dict(hf_config(model_config))
    twin = openelm.Model(args)
    weights = to_hf_state_dict(model, model_config)
    twin.load_weights([(name, mx.array(value)) for name, value in weights.items()], strict=True)
    return twin


def mlx_logits(twin, tokens) -> np.ndarray:
    """float32 logits of mlx-lm for tokens [batch, seq]."""
    import mlx.core as mx

    return np.array(twin(mx.array(np.asarray(tokens, dtype=np.int32))).astype(mx.float32))


def small_model(variant="270m", seed=0, **overrides):
    config = scaled_variant_config(variant, **overrides)
    return config, build_model(config.model, seed=seed)


def forward(model, tokens, segment_ids=None, positions=None) -> np.ndarray:
    """Jitted float32 logits (an eager call would compile every op separately)."""
    import jax.numpy as jnp

    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(
        _jitted_forward(model, tokens, jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32))
    )


def _call(model, tokens, segment_ids, positions):
    return model(tokens, segment_ids=segment_ids, positions=positions)


try:
    from flax import nnx as _nnx

    _jitted_forward = _nnx.jit(_call)
except ImportError:  # pragma: no cover
    _jitted_forward = _call


def packed_rows(lengths_per_row, seq: int, vocab: int, rng):
    """Random documents packed into rows: (tokens, segment_ids, positions) each [rows, seq],
    and [(row, start, document)]. Row r holds documents of `lengths_per_row[r]`, segment ids
    1.., positions restarting at 0, then 0-padding."""
    tokens = np.zeros((len(lengths_per_row), seq), np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    documents = []
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for index, length in enumerate(lengths):
            document = rng.integers(0, vocab, size=length)
            tokens[row, start : start + length] = document
            segment_ids[row, start : start + length] = index + 1
            positions[row, start : start + length] = np.arange(length)
            documents.append((row, start, document))
            start += length
    return tokens, segment_ids, positions, documents
