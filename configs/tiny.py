"""A small layer-wise scaled OpenELM that trains on a laptop CPU on the embedded corpus."""
from elmjax.config import openelm_config


def get_config():
    config = openelm_config(
        num_layers=6,
        model_dim=256,
        head_dim=32,
        peak_lr=3e-3,
        ffn_dim_divisor=64,
        vocab_size=4096,
        max_seq_len=256,
    )
    config.train.steps = 600
    config.train.batch_size = 16
    config.train.seq_len = 128
    config.train.log_every = 20
    config.optim.warmup_steps = 60
    config.checkpoint.every_steps = 200
    config.eval.every_steps = 200
    return config
