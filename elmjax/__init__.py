"""elmjax: a JAX/Flax NNX pretraining stack for OpenELM, OLMoE and BTLM language models."""

__version__ = "0.1.0"
