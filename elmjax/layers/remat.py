"""Activation checkpointing policies per block (`config.model.remat_policy`)."""
from __future__ import annotations

import jax

# Policy name -> what the backward pass may keep instead of recomputing. "none" (no remat)
# is not a policy: blocks then run as they are.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
REMAT_POLICY_NAMES = ("none", *REMAT_POLICIES)
