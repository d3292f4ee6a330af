"""A small OLMoE-style MoE that trains on a laptop CPU on the embedded corpus.

configs/tiny.py's data, batch, steps and learning rate, with OLMoE's architecture: 4 layers
of d 192 (6 heads of 32, QK-norm over all of q and k), each feed-forward 8 SwiGLU experts of
inner width 256 with top-2 routing, untied embeddings over a 4096-piece tokenizer. A token
uses 2 of the 8 experts, about the FFN compute of the dense tiny model (README.md,
"Models", compares their held-out losses).
"""
from elmjax.config import family_config


def get_config():
    config = family_config(
        "olmoe",
        num_layers=4,
        model_dim=192,
        head_dim=32,
        num_heads=6,
        num_kv_heads=6,
        vocab_size=4096,
        max_seq_len=256,
        tie_embeddings=False,
        norm_eps=1e-5,
        qk_norm="full",
        ffn_dim=256,
        num_experts=8,
        num_experts_per_tok=2,
        peak_lr=1e-2,  # configs/tiny.py's
    )
    config.train.steps = 500
    config.train.batch_size = 16
    config.train.seq_len = 128
    config.train.log_every = 25
    config.train.z_loss = 0.0
    config.optim.warmup_steps = 50
    config.optim.weight_decay_on = "all"
    config.checkpoint.every_steps = 250
    config.eval.every_steps = 250
    return config
