"""BTLM-3B-8K (Cerebras, arXiv 2309.11568): SPEC §3's architecture and pretraining recipe.

32 layers, d 2560, 32 heads of 80, SwiGLU inner 6826, GPT-2 BPE vocabulary (50257), 8192
context, tied embeddings, LayerNorm (eps 1e-5) with bias, biases on every projection, ALiBi
and no position embeddings; muP relative to a base width of 256 (embeddings x 14.6, logits x
2.22 x 0.1, attention 1/head_dim, hidden matrices at 0.1 x the learning rate, truncated-normal
init with std 0.073). Recipe: 470B tokens at 2048 x 1920, then 157B at 8192 x 480 (the same
3,932,160 tokens per batch), AdamW (0.9, 0.95, eps 1e-8, wd 0.1), clip 1.0, 95 warmup steps to
1.2e-2, then linear decay to 1.01e-4. `train.seq_len` / `batch_size` are the 8K stage's shape
(the stages set the run's shapes; `--dry_run` compiles each stage's).
"""
from elmjax.config import family_config

PEAK_LR = 1.2e-2
STAGES = ((470_000_000_000, 2048, 1920), (627_000_000_000, 8192, 480))  # (end, seq_len, batch) in tokens


def get_config():
    config = family_config(
        "btlm",
        num_layers=32,
        model_dim=2560,
        head_dim=80,
        num_heads=32,
        ffn_dim=6826,
        vocab_size=50257,
        max_seq_len=8192,
        norm_type="layer_norm",
        norm_eps=1e-5,
        qk_norm="none",
        position_encoding="alibi",
        use_bias=True,
        tie_embeddings=True,
        embedding_scale=14.6,
        mup_base_width=256,
        mup_output_alpha=2.22,
        mup_init_std=0.073,
        remat_policy="full",
        peak_lr=PEAK_LR,
    )
    config.data.tokenizer = "gpt2"  # GPT-2's BPE from openai-whisper's installed file
    config.train.seq_len, config.train.batch_size = 8192, 480
    config.train.stages, config.train.stage_unit = STAGES, "tokens"
    config.train.steps = 159_455  # where the token stages end (validation checks it)
    config.train.z_loss = 0.0  # BTLM's loss is plain cross-entropy
    config.optim.init_lr = 0.0
    config.optim.warmup_steps = 95
    config.optim.schedule = "linear"
    config.optim.final_lr_ratio = 1.01e-4 / PEAK_LR
    config.optim.weight_decay = 0.1
    return config
