"""Chat fine-tuning of the tiny model with LoRA adapters (SPEC §1's PEFT recipe) instead of
every weight: configs/sft_tiny.py's data and schedule length, r 32, alpha 32, dropout 0.1 on
token_embeddings, qkv_proj, out_proj, proj_1 and proj_2, base weights and norms frozen, AdamW
without weight decay on a cosine schedule (3e-3 -> 3e-4 here: the recipe's 3e-4 is for
billion-parameter models, and its 1000 warmup steps exceed this 150-step run).

    python -m elmjax.train --config=configs/lora_sft_tiny.py --workdir=runs/lora_sft_tiny \\
        --config.train.init_from=runs/tiny

Checkpoints hold the adapters and their optimizer state only; `tools/export.py --to torch`
exports the merged model, `--adapters peft|mlx` the adapters alone.
"""
import pathlib

from elmjax.config import load_config_file, with_adapters


def get_config():
    config = with_adapters(load_config_file(pathlib.Path(__file__).with_name("sft_tiny.py")), "lora")
    config.optim.peak_lr = 3e-3
    config.optim.warmup_steps = 15
    return config
