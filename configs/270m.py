"""OpenELM-270M: the paper's variant (SPEC §1) and its pretraining recipe."""
from elmjax.config import openelm_config


def get_config():
    return openelm_config(num_layers=16, model_dim=1280, head_dim=64, peak_lr=5.3e-3, remat_policy="none")
