"""Chat fine-tuning of the tiny model (configs/tiny.py) on the embedded conversations.

The same 2.15 M-parameter model, trained on `embedded:chat` (chitchat-dataset's two-person
conversations in OpenELM-Instruct's chat template, elmjax/data/chat.py) with the loss on the
assistant's tokens only; the held-out loss is over the assistant tokens of held-out
conversations, measured before the first step too. A full fine-tune (every parameter
trains) from a tiny checkpoint given on the command line:

    python -m elmjax.train --config=configs/sft_tiny.py --workdir=runs/sft_tiny \\
        --config.train.init_from=runs/tiny

150 steps of 16 x 128 tokens take about two minutes on a 2-core CPU. The tokenizer comes with
the checkpoint (its workdir keeps it), so data.tokenizer stays empty.
"""
from elmjax.config import load_config_file
import pathlib


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    config.data.source = "embedded:chat"
    config.data.chat_template = "openelm"
    config.data.eval_fraction = 0.02  # ~80 held-out conversations
    config.train.steps = 150
    config.train.sample_at_end = False  # the end-of-run sample is plain text, not a chat turn
    config.optim.peak_lr = 3e-3  # below pretraining's 1e-2: adapt, not relearn
    config.optim.warmup_steps = 15
    config.checkpoint.every_steps = 150
    config.eval.every_steps = 50
    config.eval.batches = 8
    config.eval.at_start = True  # the held-out loss of the starting checkpoint, for comparison
    return config
