"""A very small OLMoE (2 layers, 8 experts, top-2) for the training tests, like
train_micro_config.py for OpenELM: 8 steps, a checkpoint every 4."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from olmoe_support import micro_moe_config  # noqa: E402


def get_config():
    return micro_moe_config()
