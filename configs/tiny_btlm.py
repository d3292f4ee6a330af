"""A small BTLM-style model (ALiBi, SwiGLU, LayerNorm with biases, muP) that trains on the
embedded corpus on a laptop CPU with BTLM's two-stage context schedule.

4 layers of 6 heads of 32 (d 192; six heads, not a power of two, use ALiBi's interleaved
slopes), SwiGLU inner 512, muP relative to a base width of 64 (width multiplier 3) with
BTLM's multipliers (embeddings x 14.6, logits x 2.22 / 3, attention 1/head_dim) and init
(std 0.073). A 4096-piece tokenizer trained on the corpus (GPT-2's 50257-token vocabulary
would make the output layer most of the model and of the compute). Steps 1-300 train on
32 x 64 tokens, steps 301-400 on 8 x 256 tokens (the same 2048 tokens per batch; the loader
re-packs at the boundary); warmup 20 steps to 1.2e-2, then linear decay to 1e-4.
"""
from elmjax.config import family_config


def get_config():
    config = family_config(
        "btlm",
        num_layers=4,
        model_dim=192,
        head_dim=32,
        num_heads=6,
        ffn_dim=512,
        vocab_size=4096,
        max_seq_len=512,
        norm_type="layer_norm",
        norm_eps=1e-5,
        qk_norm="none",
        position_encoding="alibi",
        use_bias=True,
        embedding_scale=14.6,
        mup_base_width=64,
        mup_output_alpha=2.22,
        mup_init_std=0.073,
        peak_lr=1.2e-2,
    )
    config.train.steps = 400
    config.train.seq_len, config.train.batch_size = 256, 8
    config.train.stages = ((300, 64, 32), (400, 256, 8))
    config.train.log_every = 25
    config.optim.init_lr = 0.0
    config.optim.warmup_steps = 20
    config.optim.schedule = "linear"
    config.optim.final_lr_ratio = 1e-4 / 1.2e-2
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 100
    return config
