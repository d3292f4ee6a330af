"""Shared helpers of the export/import/averaging tests: tiny configs and random models.

`random_params` differs from `build_model` on purpose: its norm weights are not all ones,
so a converter that swaps or drops a norm weight changes the logits and fails the tests.
"""
import numpy as np
from flax import nnx

from elmjax.config import openelm_config, validate
from elmjax.tree import path_name
from elmjax.layers.decoder import abstract_model
from model_helpers import forward


def tiny_config(num_layers=3, model_dim=128, head_dim=32, ffn_dim_divisor=64, vocab_size=384, max_seq_len=64):
    """A validated full config of a small layer-wise scaled OpenELM (heads differ per layer)."""
    config = openelm_config(
        num_layers=num_layers, model_dim=model_dim, head_dim=head_dim, peak_lr=1e-3,
        ffn_dim_divisor=ffn_dim_divisor, vocab_size=vocab_size, max_seq_len=max_seq_len,
    )
    config.train.seq_len = max_seq_len
    return validate(config)


def random_params(model_config, seed=0) -> nnx.State:
    """float32 parameters shaped like `nnx.state(model, nnx.Param)`: kernels [in, out] ~
    N(0, in^-1/2), embedding ~ N(0, d^-1/2), norm weights 1 + N(0, 0.1) (not all ones, so a
    swapped norm shows up in the logits)."""
    rng = np.random.default_rng(seed)
    abstract = nnx.state(abstract_model(model_config), nnx.Param)

    def draw(path, variable):
        name = path_name(path)
        shape = variable.shape
        if name.endswith("kernel"):
            value = rng.normal(0.0, shape[0] ** -0.5, shape)
        elif name == "token_embeddings":
            value = rng.normal(0.0, shape[1] ** -0.5, shape)
        else:
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        return path, variable.replace(value=value.astype(np.float32))

    return nnx.from_flat_state([draw(path, v) for path, v in nnx.to_flat_state(abstract)])


def logits(model_config, params, tokens) -> np.ndarray:
    """elmjax's float32 logits [batch, seq, vocab] for `params` (jitted forward)."""
    graphdef, _ = nnx.split(abstract_model(model_config))
    return forward(nnx.merge(graphdef, params), tokens)


def model_logits(model, tokens) -> np.ndarray:
    """Jitted float32 logits of an nnx model (e.g. from `elmjax.training.checkpoint.load_model`)."""
    return forward(model, tokens)


def train_tiny(workdir, steps=6, every=2, vocab_size=512):
    """Trains a 2-layer model for `steps` steps on the embedded corpus with the real trainer,
    checkpointing every `every` steps; returns its config."""
    from elmjax.training.loop import train

    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=32, vocab_size=vocab_size, max_seq_len=32)
    config.train.steps, config.train.batch_size, config.train.seq_len = steps, 8, 32
    config.train.log_every, config.train.sample_at_end = every, False
    config.optim.warmup_steps = 2
    config.checkpoint.every_steps, config.checkpoint.async_save = every, False
    config.eval.every_steps = 0
    train(validate(config), workdir, log=lambda *_: None)
    return config
