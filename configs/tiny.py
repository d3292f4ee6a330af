"""A small layer-wise scaled OpenELM that trains on a laptop CPU on the embedded corpus.

4 layers with query heads 4, 4, 8, 8 and FFN widths 128..768 (2.15 M parameters, a
4096-piece tokenizer trained on the corpus). The default run (500 steps of 16 x 128 tokens,
~1 M tokens) takes a few minutes on a 2-core CPU and brings the loss well below the corpus'
unigram entropy (README.md, "Training").
"""
from elmjax.config import openelm_config


def get_config():
    config = openelm_config(
        num_layers=4,
        model_dim=192,
        head_dim=32,
        peak_lr=1e-2,  # a model this small tolerates (and needs) a larger LR than the paper's
        ffn_dim_divisor=64,
        vocab_size=4096,
        max_seq_len=256,
    )
    config.train.steps = 500
    config.train.batch_size = 16
    config.train.seq_len = 128
    config.train.log_every = 25
    config.optim.warmup_steps = 50
    config.checkpoint.every_steps = 250
    config.eval.every_steps = 250
    return config
