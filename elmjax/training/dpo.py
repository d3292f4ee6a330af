"""Direct preference optimisation (SPEC §5, TRL's definition): the loss and its metrics.

A preference batch holds pairs: rows 2i (chosen) and 2i+1 (rejected) share a prompt, and
`loss_mask` marks each row's completion tokens (elmjax/data/preference.py). A sequence's
log-probability is the sum over its completion tokens of log p(target | context). With
beta > 0 and

  delta = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)

the sigmoid loss is -log sigmoid(beta delta) and the hinge loss relu(1 - beta delta); the
reported rewards are beta (logp - ref) per sequence, the reward margin their difference and
the preference accuracy the fraction of pairs whose chosen reward is the larger.

The reference log-probabilities come from the same weights with the adapters switched off
(`dpo.reference="base"`: a LoRA/DoRA run's frozen base, with no second copy of the weights),
or, when every weight trains (OpenELM-Instruct's recipe), from a frozen copy of the starting
weights (`"initial"`, from `train.init_from`): the frozen variables are then
{"model": the model's frozen variables, "reference": that copy} (`model_frozen`,
`with_reference`), which costs one more copy of the parameters in memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.layers import adapters

DPO_LOSSES = ("sigmoid", "hinge")
DPO_REFERENCES = ("base", "initial")


def uses_initial_reference(config) -> bool:
    """Whether the run keeps a frozen copy of its starting weights as DPO's reference."""
    return config.train.get("objective", "lm") == "dpo" and config.dpo.reference == "initial"


def with_reference(model_frozen, reference_params) -> dict:
    """The frozen variables of a `dpo.reference="initial"` run."""
    return {"model": model_frozen, "reference": reference_params}


def model_frozen(config, frozen):
    """The model's own frozen variables out of a run's frozen variables."""
    return frozen["model"] if uses_initial_reference(config) else frozen


def sequence_logps(logits, targets, loss_mask):
    """Per-row sums of log p(target) over `loss_mask`: logits [rows, seq, vocab], targets and
    loss_mask [rows, seq] -> [rows] float32."""
    logits = logits.astype(jnp.float32)
    token_logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logps * loss_mask.astype(jnp.float32), axis=-1)


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, kind: str):
    """(per-pair losses, chosen rewards, rejected rewards), each [pairs] float32, from the
    sequence log-probabilities of the policy and the reference."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    logits = chosen_rewards - rejected_rewards  # beta * delta
    if kind == "sigmoid":
        losses = -jax.nn.log_sigmoid(logits)
    elif kind == "hinge":
        losses = jax.nn.relu(1.0 - logits)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; dpo.loss must be one of {', '.join(DPO_LOSSES)}")
    return losses, chosen_rewards, rejected_rewards


def reference_logps(model, batch, reference: str):
    """Reference sequence log-probabilities [rows] of `model`: with its adapters off
    ("base"), or as it is (`model` is then the reference copy, "initial")."""
    if reference not in DPO_REFERENCES:
        raise ValueError(f"unknown DPO reference {reference!r}; dpo.reference must be one of {', '.join(DPO_REFERENCES)}")
    with adapters.disabled():
        logits, _ = model.forward(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return jax.lax.stop_gradient(sequence_logps(logits, batch["targets"], batch["loss_mask"]))


def summed_dpo_loss(params, frozen, graphdef, batch, *, beta: float, kind: str, reference: str,
                    scale=1.0, dropout_key=None):
    """`scale` * the summed DPO loss of the batch's pairs. Returns (total, terms): terms hold
    `scale` * the sums of the loss, reward margin, preference accuracy, chosen and rejected
    rewards, and of the chosen completions' mean token negative log-likelihood."""
    own_frozen = frozen["model"] if reference == "initial" else frozen
    model = nnx.merge(graphdef, params, own_frozen)
    with adapters.dropout_key(dropout_key):
        logits, _ = model.forward(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    policy = sequence_logps(logits, batch["targets"], batch["loss_mask"])  # [rows]
    if reference == "initial":
        model = nnx.merge(graphdef, frozen["reference"], own_frozen)
    ref = reference_logps(model, batch, reference)
    losses, chosen, rejected = preference_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=beta, kind=kind)
    chosen_tokens = jnp.sum(batch["loss_mask"][0::2].astype(jnp.float32), axis=-1)
    real = (chosen_tokens > 0).astype(jnp.float32)  # [pairs]; 0 for the padding pairs of a last eval batch
    terms = {
        "loss": jnp.sum(real * losses),
        "reward_margin": jnp.sum(real * (chosen - rejected)),
        "preference_accuracy": jnp.sum(real * (chosen > rejected).astype(jnp.float32)),
        "chosen_reward": jnp.sum(real * chosen),
        "rejected_reward": jnp.sum(real * rejected),
        "chosen_nll": jnp.sum(real * -policy[0::2] / jnp.maximum(chosen_tokens, 1.0)),
    }
    terms = {name: value * scale for name, value in terms.items()}
    return terms["loss"], terms


def eval_sums(params, frozen, graphdef, batch, *, beta: float, kind: str, reference: str):
    """Sums over the batch's pairs of the DPO terms (`summed_dpo_loss`), and the number of
    pairs (padding pairs, whose rows hold no completion, count in neither)."""
    _, terms = summed_dpo_loss(params, frozen, graphdef, batch, beta=beta, kind=kind, reference=reference)
    pairs = jnp.sum((jnp.sum(batch["loss_mask"][0::2], axis=-1) > 0).astype(jnp.float32))
    return terms, pairs
