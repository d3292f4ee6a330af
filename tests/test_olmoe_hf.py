"""elmjax's OLMoE equals transformers' `OlmoeForCausalLM` (torch 2.13, CPU, float32): logits,
per-layer router logits, packed documents, and the load-balance loss up to its factor k.

The transformers model writes its weights with `save_pretrained` (SPEC §2 names); elmjax
reads them with its importer, so the names, the q/k/v fusion and the expert stacking are
checked with the forward pass.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from elmjax.convert.hf_import import load_hf_dir
from elmjax.layers.decoder import abstract_model
from elmjax.layers.moe import router
from model_helpers import forward, packed_rows
from olmoe_support import hf_logits, hf_olmoe

TOLERANCE = 1e-4
SEQ = 24

CASES = {
    "top2_of_8": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "top2_of_8_normalised": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "top8_of_16": dict(num_experts=16, num_experts_per_tok=8, norm_topk_prob=False),
    "top8_of_16_normalised": dict(num_experts=16, num_experts_per_tok=8, norm_topk_prob=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def twins(request, tmp_path_factory):
    """(case, transformers model, elmjax config, elmjax model) holding the same weights."""
    hf = hf_olmoe(seed=sorted(CASES).index(request.param), **CASES[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    config, params = load_hf_dir(directory)
    graphdef, _ = nnx.split(abstract_model(config.model))
    return request.param, hf, config, nnx.merge(graphdef, params)


def tokens(seed, shape=(2, SEQ)):
    return np.random.default_rng(seed).integers(0, 128, size=shape).astype(np.int32)


@nnx.jit
def router_logits_per_layer(model, tokens):
    """Each layer's router logits [batch, seq, E], from the model's own modules."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segment_ids = jnp.ones_like(tokens)
    h, rope = model.embed(tokens), model.rope(positions)
    out = []
    for block in model.layers:
        after_attention = h + block.attn(block.attn_norm(h), rope=rope, segment_ids=segment_ids)
        out.append(block.ffn.router(block.ffn_norm(after_attention)))
        h, _ = block(h, rope, segment_ids)
    return out


def test_import_reads_the_transformers_config(twins):
    case, hf, config, _ = twins
    model = config.model
    assert (model.family, model.num_layers, model.model_dim, model.num_heads, model.head_dim) == ("olmoe", 3, 64, 4, 16)
    assert (model.num_experts, model.num_experts_per_tok, model.norm_topk_prob) == (
        CASES[case]["num_experts"], CASES[case]["num_experts_per_tok"], CASES[case]["norm_topk_prob"])
    assert (model.ffn_dim, model.qk_norm, model.tie_embeddings, model.norm_eps) == (32, "full", False, 1e-5)


def test_logits_equal_transformers(twins):
    _, hf, _, model = twins
    ids = tokens(0)
    expected, _ = hf_logits(hf, ids)
    np.testing.assert_allclose(forward(model, ids), expected, atol=TOLERANCE, rtol=0)


def test_router_logits_per_layer_equal_transformers(twins):
    _, hf, config, model = twins
    ids = tokens(1)
    _, expected = hf_logits(hf, ids)
    ours = router_logits_per_layer(model, jnp.asarray(ids))
    assert len(ours) == len(expected) == config.model.num_layers
    for layer, (mine, theirs) in enumerate(zip(ours, expected)):
        np.testing.assert_allclose(np.asarray(mine).reshape(theirs.shape), theirs, atol=TOLERANCE, rtol=0,
                                   err_msg=f"layer {layer}")


def test_packed_row_logits_equal_each_document_alone(twins):
    _, hf, _, model = twins
    rng = np.random.default_rng(2)
    # document lengths; row 0 ends in 0 padding tokens
    ids, segment_ids, positions, documents = packed_rows([[9, 11, 4], [5, 19]], SEQ, 128, rng)
    ours = forward(model, ids, segment_ids, positions)
    for row, start, document in documents:
        expected, _ = hf_logits(hf, document[None])
        np.testing.assert_allclose(ours[row, start : start + len(document)], expected[0], atol=TOLERANCE, rtol=0)


def test_load_balance_is_transformers_loss_over_top_k(twins):
    """Per layer, transformers' `load_balancing_loss_func` (f_i summing to k) equals k times
    elmjax's (f_i summing to 1); the layer's value is 1 at perfect balance."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    _, hf, config, model = twins
    k, experts = config.model.num_experts_per_tok, config.model.num_experts
    _, router_logits = hf_logits(hf, tokens(3))
    for logits in router_logits:
        probs, _, chosen = router.route(jnp.asarray(logits), k)
        theirs = float(load_balancing_loss_func((torch.from_numpy(logits),), experts, k))
        assert float(router.load_balance_loss(probs, chosen)) * k == pytest.approx(theirs, rel=1e-5)


def test_model_aux_terms_are_the_layer_means(twins):
    """The model's `load_balance` and `router_z_loss` are the means over layers of the
    per-layer values (z-loss checked against torch.logsumexp); `expert_load` is per layer."""
    _, hf, config, model = twins
    ids = tokens(4)
    _, router_logits = hf_logits(hf, ids)
    k = config.model.num_experts_per_tok
    _, aux = nnx.jit(lambda m, t: m.forward(t))(model, jnp.asarray(ids))
    balance, z, loads = [], [], []
    for logits in router_logits:
        probs, _, chosen = router.route(jnp.asarray(logits), k)
        balance.append(float(router.load_balance_loss(probs, chosen)))
        z.append(float(torch.logsumexp(torch.from_numpy(logits), dim=-1).square().mean()))
        counts = np.bincount(np.asarray(chosen).reshape(-1), minlength=config.model.num_experts)
        loads.append(counts.max() / counts.mean())
    value, weight = aux["losses"]["load_balance"]
    assert float(value) == pytest.approx(np.mean(balance), rel=1e-4) and float(weight) == pytest.approx(0.01)
    value, weight = aux["losses"]["router_z_loss"]
    assert float(value) == pytest.approx(np.mean(z), rel=1e-4) and float(weight) == pytest.approx(0.001)
    for layer, load in enumerate(loads):
        assert float(aux["metrics"][f"layer{layer}/expert_load"]) == pytest.approx(load, rel=1e-6)


def test_routing_equals_transformers_router(twins):
    """Routing itself: transformers' `OlmoeTopKRouter` with an identity weight maps logits to
    (weights, experts); elmjax's `route` picks the same experts with the same weights."""
    import copy

    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    case, hf, config, _ = twins
    _, router_logits = hf_logits(hf, tokens(5))
    experts = config.model.num_experts
    identity_config = copy.deepcopy(hf.config)
    identity_config.hidden_size = experts
    reference = OlmoeTopKRouter(identity_config)
    with torch.no_grad():
        reference.weight.copy_(torch.eye(experts))
    for logits in router_logits:
        with torch.no_grad():
            _, expected_weights, expected_experts = reference(torch.from_numpy(logits))
        _, weights, chosen = router.route(jnp.asarray(logits), config.model.num_experts_per_tok,
                                          CASES[case]["norm_topk_prob"])
        np.testing.assert_array_equal(np.asarray(chosen), expected_experts.numpy())
        np.testing.assert_allclose(np.asarray(weights), expected_weights.numpy(), atol=1e-6, rtol=0)
