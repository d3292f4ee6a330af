"""DPO of the chat-tuned tiny model on preference pairs built from the embedded conversations
(chosen: a conversation's real reply; rejected: a reply from another conversation), with LoRA
adapters whose frozen base is the DPO reference (`dpo.reference="base"`, no second copy).

    python -m elmjax.train --config=configs/dpo_tiny.py --workdir=runs/dpo_tiny \\
        --config.train.init_from=runs/sft_tiny

Held-out preference accuracy (pairs from held-out conversations) is measured before the
first step and every 50 steps; README.md, "Preference tuning (DPO)", gives the figures.
"""
import pathlib

from elmjax.config import load_config_file, with_adapters


def get_config():
    config = with_adapters(load_config_file(pathlib.Path(__file__).with_name("sft_tiny.py")), "lora")
    config.train.objective = "dpo"
    config.dpo.beta = 0.1
    config.dpo.loss = "sigmoid"
    config.train.steps = 200
    config.train.batch_size = 16  # 8 pairs
    config.data.max_prompt_len = 96
    config.optim.peak_lr = 3e-3
    config.optim.warmup_steps = 20
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 50
    config.eval.batches = 16  # 128 held-out pairs
    return config
