"""elmjax: a JAX/Flax NNX pretraining stack for OpenELM-family language models."""

__version__ = "0.1.0"
