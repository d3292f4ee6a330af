"""DPO of the chat-tuned tiny model on preference pairs built from the embedded conversations
(chosen: a conversation's real reply; rejected: a reply from another conversation). Every
weight trains; the reference is a frozen copy of the starting weights
(`dpo.reference="initial"`). With LoRA instead (`--config.model.adapter.kind=lora
--config.dpo.reference=base`: the frozen base is the reference, no second copy) the tiny model
did not get past chance on held-out pairs in 200 steps (README.md).

    python -m elmjax.train --config=configs/dpo_tiny.py --workdir=runs/dpo_tiny \\
        --config.train.init_from=runs/sft_tiny

Held-out preference accuracy (pairs from held-out conversations) is measured before the
first step and every 150 steps; README.md, "Preference tuning (DPO)", gives the figures.
"""
import pathlib

from elmjax.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("sft_tiny.py"))
    config.train.objective = "dpo"
    config.dpo.beta = 0.1
    config.dpo.loss = "sigmoid"
    config.dpo.reference = "initial"
    config.train.steps = 450
    config.train.batch_size = 32  # 16 pairs
    config.data.max_prompt_len = 96
    config.optim.peak_lr = 1e-3
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 0.0
    config.checkpoint.every_steps = 150
    config.eval.every_steps = 150
    config.eval.batches = 16  # every held-out pair
    return config
