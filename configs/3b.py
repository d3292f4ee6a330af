"""OpenELM-3B: the paper's variant (SPEC §1) and its pretraining recipe."""
from elmjax.config import openelm_config


def get_config():
    return openelm_config(num_layers=36, model_dim=3072, head_dim=128, peak_lr=1.2e-3, remat_policy="full")
