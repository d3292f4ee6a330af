"""OpenELM-1.1B: the paper's variant (SPEC §1) and its pretraining recipe."""
from elmjax.config import openelm_config


def get_config():
    return openelm_config(num_layers=28, model_dim=2048, head_dim=64, peak_lr=2.4e-3, remat_policy="full")
