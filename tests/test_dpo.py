"""DPO (elmjax/training/dpo.py) against TRL's published definition (SPEC §5), implemented here
independently in PyTorch: per-sequence log-probability sums over completion tokens,
delta = (logp_c - ref_c) - (logp_r - ref_r), sigmoid -logsigmoid(beta delta), hinge
relu(1 - beta delta)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from adapter_support import adapted_model, adapted_params, adapter_config, base_config_of
from elmjax import trainable
from elmjax.layers import adapters
from elmjax.training import dpo
from elmjax.training import step as ts
from model_helpers import forward

RNG = np.random.default_rng(3)


def torch_dpo(policy_c, policy_r, ref_c, ref_r, beta, kind):
    logits = (torch.tensor(policy_c) - torch.tensor(ref_c)) - (torch.tensor(policy_r) - torch.tensor(ref_r))
    if kind == "sigmoid":
        return (-F.logsigmoid(beta * logits)).numpy()
    return torch.relu(1 - beta * logits).numpy()


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_preference_loss_equals_trl_definition(kind):
    logps = [RNG.normal(-40.0, 8.0, 16).astype(np.float32) for _ in range(4)]
    losses, chosen, rejected = dpo.preference_loss(*map(jnp.asarray, logps), beta=0.1, kind=kind)
    np.testing.assert_allclose(losses, torch_dpo(*logps, 0.1, kind), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chosen - rejected, 0.1 * ((logps[0] - logps[2]) - (logps[1] - logps[3])), rtol=1e-5)


def test_sequence_logps_sum_completion_tokens_only():
    logits = RNG.normal(0, 2, (3, 7, 11)).astype(np.float32)
    targets = RNG.integers(0, 11, (3, 7))
    mask = (RNG.random((3, 7)) > 0.4).astype(np.float32)
    expected = (torch.log_softmax(torch.tensor(logits), -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
                * torch.tensor(mask)).sum(-1).numpy()
    np.testing.assert_allclose(dpo.sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)),
                               expected, rtol=1e-5)


def test_reference_pass_is_the_base_model():
    config = adapter_config("dora", targets="token_embeddings,qkv_proj,out_proj,proj_1,proj_2")
    params = adapted_params(config)
    base = {k: v for k, v in params.items() if k != "embedding_adapter"}
    model = adapted_model(config, params)
    tokens = jnp.asarray(RNG.integers(0, 256, (2, 12)))
    # eager calls: the switch is read while tracing, and a cached jit trace would not see it
    adapted = np.asarray(model(tokens))
    with adapters.disabled():
        reference = np.asarray(model(tokens))
    from elmjax import tree

    base_params = tree.unflatten({k: v for k, v in tree.flatten(base).items() if "adapter" not in k})
    np.testing.assert_allclose(reference, forward(adapted_model(base_config_of(config), base_params), tokens), atol=1e-5, rtol=0)
    assert np.abs(reference - adapted).max() > 1e-2  # the adapters do change the model


def pair_batch(rows=8, seq=16, vocab=256, prompt=6):
    """Rows 2i (chosen) / 2i+1 (rejected): the same prompt, different completions; the loss
    mask covers the completion."""
    tokens = RNG.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    tokens[1::2, :prompt] = tokens[0::2, :prompt]
    mask = np.zeros((rows, seq), np.float32)
    mask[:, prompt - 1:] = 1.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((rows, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq), (rows, seq)).astype(np.int32), "loss_mask": mask}


@pytest.mark.parametrize("kind,expected", [("sigmoid", np.log(2.0)), ("hinge", 1.0)])
def test_fresh_adapters_start_at_the_loss_of_a_zero_margin(kind, expected):
    from elmjax.layers.decoder import build_model

    config = adapter_config("lora")
    config.dpo.loss = kind
    model = build_model(config.model, seed=0)  # B = 0: the policy equals the reference
    graphdef, train_state, frozen = nnx.split(model, trainable.trainable_filter(config.model), ...)
    loss, terms, _ = ts.dpo_loss_and_grads(nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen), graphdef,
                                           pair_batch(), dpo_config=config.dpo, accum_steps=1)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(terms["reward_margin"]) == 0.0


def test_accumulated_dpo_gradients_equal_one_shot():
    config = adapter_config("lora")
    model = adapted_model(config, adapted_params(config))
    graphdef, train_state, frozen = nnx.split(model, trainable.trainable_filter(config.model), ...)
    params, frozen = nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen)
    batch = pair_batch()
    one = jax.jit(lambda p: ts.dpo_loss_and_grads(p, frozen, graphdef, batch, dpo_config=config.dpo, accum_steps=1))(params)
    two = jax.jit(lambda p: ts.dpo_loss_and_grads(p, frozen, graphdef, batch, dpo_config=config.dpo, accum_steps=2))(params)
    np.testing.assert_allclose(one[0], two[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one[2]), jax.tree.leaves(two[2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_padding_pairs_count_in_no_held_out_sum():
    config = adapter_config("lora")
    model = adapted_model(config, adapted_params(config))
    graphdef, train_state, frozen = nnx.split(model, trainable.trainable_filter(config.model), ...)
    params, frozen = nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen)
    batch = pair_batch(rows=8)
    padded = {key: np.concatenate([value, np.zeros_like(value[:4])]) for key, value in batch.items()}
    sums = lambda b: dpo.eval_sums(params, frozen, graphdef, b, beta=0.1, kind="sigmoid", reference="base")
    (terms, pairs), (padded_terms, padded_pairs) = sums(batch), sums(padded)
    assert (float(pairs), float(padded_pairs)) == (4.0, 4.0)
    for name in terms:
        np.testing.assert_allclose(padded_terms[name], terms[name], rtol=1e-5, atol=1e-6)
