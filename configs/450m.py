"""OpenELM-450M: the paper's variant (SPEC §1) and its pretraining recipe."""
from elmjax.config import openelm_config


def get_config():
    return openelm_config(num_layers=20, model_dim=1536, head_dim=64, peak_lr=3.9e-3, remat_policy="full")
