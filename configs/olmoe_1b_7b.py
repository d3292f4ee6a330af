"""OLMoE-1B-7B (arXiv 2409.02060, SPEC §2) and its pretraining recipe.

16 layers of d 2048, 16 heads of 128, QK-norm over the whole projected q and k; every
feed-forward is 64 SwiGLU experts of inner width 1024 with top-8 routing (probabilities not
renormalised); untied embeddings over 50304 rows. 6,919,161,856 parameters, 1,282,017,280
used per token (`python tools/count_params.py --config=configs/olmoe_1b_7b.py`).
Data: set `data.tokenizer` to OLMoE's GPT-NeoX `tokenizer.json` (50280 tokens).
"""
from elmjax.config import family_config

TOKENS = 5e12  # the paper pretrains on 5 trillion tokens
BATCH, SEQ = 1024, 4096


def get_config():
    config = family_config(
        "olmoe",
        num_layers=16,
        model_dim=2048,
        head_dim=128,
        num_heads=16,
        num_kv_heads=16,  # no GQA
        vocab_size=50304,
        max_seq_len=4096,
        tie_embeddings=False,
        use_bias=False,
        norm_type="rms_norm",
        norm_eps=1e-5,
        qk_norm="full",  # RMSNorm over all 2048 q (and k) features, before the head split and RoPE
        rope_theta=10000.0,
        ffn_dim=1024,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        load_balance_weight=0.01,
        router_z_loss_weight=0.001,
        init_std=0.02,
        init_cutoff=3.0,  # truncated normal at +-3 sigma, every matrix
        remat_policy="full",  # memory, not the paper: recompute each block in the backward pass
        peak_lr=4e-4,
    )
    config.optim.warmup_steps = 2500
    config.optim.schedule = "cosine"
    config.optim.final_lr_ratio = 0.1
    config.optim.weight_decay = 0.1
    config.optim.weight_decay_on = "all"  # norms and embeddings too
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.95, 1e-8
    config.optim.clip_norm = 1.0
    config.train.batch_size = BATCH
    config.train.seq_len = SEQ
    config.train.steps = round(TOKENS / (BATCH * SEQ))  # 1,192,093
    config.train.z_loss = 0.0  # the loss is CE + router terms; no logit z-loss (SPEC §2)
    return config
