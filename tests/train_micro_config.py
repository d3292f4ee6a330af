"""A very small OpenELM for the training tests: compiles and steps in well under a second."""
from elmjax.config import openelm_config


def get_config():
    config = openelm_config(
        num_layers=2,
        model_dim=64,
        head_dim=16,
        peak_lr=1e-2,
        ffn_dim_divisor=16,
        vocab_size=512,
        max_seq_len=64,
    )
    config.train.steps = 8
    config.train.batch_size = 8
    config.train.seq_len = 32
    config.train.log_every = 1
    config.train.sample_at_end = False
    config.optim.warmup_steps = 2
    config.checkpoint.every_steps = 4
    config.eval.every_steps = 0
    return config


def synthetic_batch(config, seed: int = 0, documents_per_row: int = 2):
    """A global batch in the data contract's format: random tokens, each row packed with
    `documents_per_row` documents (segment ids 1.., positions restarting), the loss masked
    where the next token belongs to another document."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch, seq = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (batch, seq + 1)).astype(np.int32)
    boundaries = np.sort(rng.choice(np.arange(1, seq), documents_per_row - 1, replace=False))
    segment_row = np.searchsorted(boundaries, np.arange(seq + 1), side="right") + 1
    starts = np.concatenate([[0], boundaries])
    position_row = np.arange(seq + 1) - starts[segment_row - 1]
    segments = np.broadcast_to(segment_row, (batch, seq + 1)).astype(np.int32)
    positions = np.broadcast_to(position_row, (batch, seq + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments[:, :-1],
        "positions": positions[:, :-1],
        "loss_mask": (segments[:, 1:] == segments[:, :-1]).astype(np.float32),
    }
