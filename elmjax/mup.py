"""Maximal update parameterization (muP; Tensor Programs V, arXiv 2203.03466) for any family.

muP makes a model's activations and updates keep their scale as its width grows, so the
hyperparameters tuned on a narrow "base" model carry over to a wide one. It is on when
`model.mup_base_width` > 0; with the width multiplier `m = model_dim / mup_base_width`
(its inverse, `width_scale`, is what BTLM's config.json calls `mup_width_scale`):

- forward: token embeddings are multiplied by `model.embedding_scale` (a plain multiplier,
  also usable without muP; BTLM 14.6), logits by `model.mup_output_alpha / m` (BTLM
  2.22 x 0.1), and attention logits by 1/head_dim instead of 1/sqrt(head_dim) (unless
  `model.attention_scale` names a scale);
- initialisation (`MupInitRules`): truncated normal cut at +-2 sigma with sigma =
  `model.mup_init_std` for the embedding (and an untied output head), sigma / sqrt(m) for
  hidden matrices, and sigma / sqrt(m) / sqrt(2 * layers) for the projections that write into
  the residual stream (BTLM: 0.073, 0.073 / sqrt(10), 0.073 / sqrt(10) / sqrt(64); SPEC §3);
- optimizer (elmjax/training/optim.py `param_groups`): hidden matrices train at
  `peak_lr / m` (label `decay_hidden`), the embedding and an untied output head at `peak_lr`
  with weight decay (`decay_other`), norms and biases at `peak_lr` without (`no_decay`),
  as Cerebras' `get_mup_param_groups` does for BTLM.

At m = 1 a muP model is its own base model. Everything here is a function of `config.model`;
a family needs no code of its own to use muP.
"""
from __future__ import annotations

import math

from elmjax.layers.init import InitRules

# Truncation of muP's initial weights, in standard deviations (Cerebras: std 0.073 cut at
# +-0.146).
TRUNCATION_SIGMAS = 2.0


def enabled(model_config) -> bool:
    """Whether `config.model` asks for muP (`mup_base_width` > 0)."""
    return float(model_config.get("mup_base_width", 0) or 0) > 0


def width_scale(model_config) -> float:
    """`mup_base_width / model_dim` (1/m; BTLM's `mup_width_scale`), or 1.0 without muP."""
    if not enabled(model_config):
        return 1.0
    return float(model_config.mup_base_width) / float(model_config.model_dim)


def logit_multiplier(model_config) -> float:
    """What the logits are multiplied by: `logit_scale`, times `mup_output_alpha / m` under muP."""
    scale = float(model_config.logit_scale)
    if enabled(model_config):
        scale *= float(model_config.mup_output_alpha) * width_scale(model_config)
    return scale


def attention_scale(model_config) -> float:
    """The attention-logit scale: `model.attention_scale` when set, else 1/head_dim under muP
    (muP keeps q.k from growing with head width) and 1/sqrt(head_dim) without."""
    if model_config.attention_scale is not None:
        return float(model_config.attention_scale)
    head_dim = model_config.head_dim
    return 1.0 / head_dim if enabled(model_config) else head_dim**-0.5


def hidden_lr_scale(model_config) -> float | None:
    """The factor on the hidden matrices' learning rate (1/m), or None without muP (then the
    optimizer keeps its two plain groups, decay and no_decay)."""
    return width_scale(model_config) if enabled(model_config) else None


class MupInitRules(InitRules):
    """muP's initialisation (see the module docstring): truncated normal, +-2 sigma."""

    def __init__(self, model_config):
        super().__init__(model_config.model_dim, model_config.num_layers)
        self.std = float(model_config.mup_init_std)
        self.hidden_std = self.std * math.sqrt(width_scale(model_config))  # sigma / sqrt(m)

    def embedding(self) -> tuple:
        return ("truncated_normal", self.std, TRUNCATION_SIGMAS)

    def linear(self, in_features: int) -> tuple:
        del in_features  # muP scales hidden matrices by the width multiplier, not fan-in
        return ("truncated_normal", self.hidden_std, TRUNCATION_SIGMAS)

    def output_projection(self) -> tuple:
        return ("truncated_normal", self.hidden_std / math.sqrt(2 * self.num_layers), TRUNCATION_SIGMAS)

    def output_head(self, in_features: int) -> tuple:
        del in_features  # the output layer is initialised like the input layer; its 1/m is
        return self.embedding()  # the logit multiplier
