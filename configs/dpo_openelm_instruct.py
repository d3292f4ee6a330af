"""OpenELM-Instruct's DPO recipe (SPEC §5) for one OpenELM size, on preference data you give:

    python -m elmjax.train --config=configs/dpo_openelm_instruct.py:270m \\
        --config.data.source=ultrafeedback_binarized.jsonl --config.train.init_from=runs/270m

Per size (corenet's settings): 270M lr 2e-5, 5 epochs, hinge; 450M 3e-5, 8, hinge; 1.1B 5e-5,
5, sigmoid; 3B 1e-4, 10, hinge; all beta 0.01, cosine schedule with 10% warmup, sequences of
1024 tokens with prompts of at most 512, chat turns in OpenELM-Instruct's template. Every
weight trains; the reference is a frozen copy of the starting weights (`dpo.reference=
"initial"`: one more copy of the parameters in memory). JSONL records hold `prompt`, `chosen`
and `rejected` (strings or chat messages, elmjax/data/preference.py).

Epochs become steps for `train.batch_size` rows (pairs x 2) and the number of pairs, which
defaults to UltraFeedback-binarized's ~61k training pairs (`:270m,pairs=N` for your data's
count). The batch size (64 pairs) is this config's choice: SPEC §5 does not give corenet's.
"""
import math
import pathlib

from elmjax.config import load_config_file

RECIPES = {  # size: (base config file, peak lr, epochs, loss)
    "270m": ("270m.py", 2e-5, 5, "hinge"),
    "450m": ("450m.py", 3e-5, 8, "hinge"),
    "1.1b": ("1_1b.py", 5e-5, 5, "sigmoid"),
    "3b": ("3b.py", 1e-4, 10, "hinge"),
}
PAIRS_PER_BATCH = 64


def get_config(arg: str = "270m"):
    size, _, pairs_arg = arg.partition(",pairs=")
    if size not in RECIPES:
        raise ValueError(f"unknown OpenELM size {size!r} in --config=...:{arg}; choose one of {', '.join(RECIPES)}")
    base_file, peak_lr, epochs, loss = RECIPES[size]
    pairs = int(pairs_arg) if pairs_arg else 61_135
    config = load_config_file(pathlib.Path(__file__).with_name(base_file))
    config.data.source = ""  # required: the preference JSONL (--config.data.source=...)
    config.data.chat_template = "openelm"
    config.data.max_prompt_len = 512
    config.train.objective = "dpo"
    config.dpo.beta = 0.01
    config.dpo.loss = loss
    config.dpo.reference = "initial"
    config.train.seq_len = 1024
    config.train.batch_size = 2 * PAIRS_PER_BATCH
    config.train.stages = ()
    config.train.steps = math.ceil(epochs * pairs / PAIRS_PER_BATCH)
    config.optim.peak_lr = peak_lr
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = config.train.steps // 10
    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    return config
