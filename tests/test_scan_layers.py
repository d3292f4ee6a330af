"""Scanning runs of alike layers (`model.scan_layers`, `model.scan_padding`,
elmjax/layers/scan.py): fewer compiled bodies, the same model.

Oracles: an exhaustive search over every grouping (the planner's choice), the unrolled model
(losses and gradients), mlx-lm's OpenELM (logits of a padded, scanned model) and the layer
schedules of SPEC §1.
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax import models
from elmjax.config import ConfigError, family_config, load_config_file, validate, with_adapters
from elmjax.layers.decoder import build_model
from elmjax.layers.scan import plan_for, plan_runs
from model_helpers import forward, mlx_logits, mlx_twin, small_model


def _plan(config):
    family = models.get(config.model.family)
    schedule = family.layer_specs(config.model)
    runs = plan_runs(schedule, max_padding=config.model.scan_padding,
                     matmul_params=lambda spec: family.layer_matmul_params(config.model, spec))
    return schedule, runs


def test_btlm_and_olmoe_scan_every_layer_as_one_run():
    for path, layers in (("configs/btlm_3b_8k.py", 32), ("configs/olmoe_1b_7b.py", 16)):
        _, runs = _plan(load_config_file(path))
        assert runs == (tuple(range(layers)),), path


def test_without_padding_openelm_joins_only_identical_layers():
    """OpenELM-1.1B (SPEC §1): FFN widths change at every layer except 13 and 14 (both 4608)."""
    schedule, runs = _plan(load_config_file("configs/1_1b.py"))
    assert len(runs) == 27
    assert (13, 14) in runs
    assert schedule[13].ffn_dim == schedule[14].ffn_dim == 4608


@pytest.mark.parametrize("budget", [0.02, 0.05, 0.1, 0.3])
def test_the_plan_has_the_fewest_runs_any_grouping_within_budget_has(budget):
    """Exhaustive search over all 2^15 groupings of OpenELM-270M's 16 layers."""
    config = load_config_file("configs/270m.py")
    config.model.scan_padding = budget
    family = models.get("openelm")
    schedule, runs = _plan(config)
    cost = lambda spec: family.layer_matmul_params(config.model, spec)
    total = sum(cost(s) for s in schedule)

    def padding(group):
        heads = {(schedule[i].num_query_heads, schedule[i].num_kv_heads) for i in group}
        if len(heads) > 1:
            return None
        widest = max(schedule[i].ffn_dim for i in group)
        return sum(cost(dataclasses.replace(schedule[i], ffn_dim=widest)) - cost(schedule[i]) for i in group)

    fewest = len(schedule)
    for cuts in itertools.product([False, True], repeat=len(schedule) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(schedule)]
        groups = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        extras = [padding(g) for g in groups]
        if None not in extras and sum(extras) <= budget * total:
            fewest = min(fewest, len(groups))
    assert len(runs) == fewest
    assert [i for run in runs for i in run] == list(range(len(schedule)))
    assert sum(padding(run) for run in runs) <= budget * total


def _loss_and_grads(config, tokens):
    model = build_model(config.model, seed=1)

    def loss(model):
        logits, aux = model.forward(tokens)
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1))
        return nll + sum(weight * value for value, weight in aux["losses"].values()), aux

    (value, aux), grads = jax.jit(lambda m: nnx.value_and_grad(loss, has_aux=True)(m))(model)
    return model, value, aux, nnx.state(grads)


def _compare_scanned_with_unrolled(config, *, loss_atol, grad_relative_norm=None):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 48)), jnp.int32)
    config.model.scan_layers = False
    unrolled_model, unrolled, unrolled_aux, unrolled_grads = _loss_and_grads(config, tokens)
    config.model.scan_layers = True
    model, scanned, aux, grads = _loss_and_grads(config, tokens)
    assert len(model.plan.runs) < len(model.schedule) and len(unrolled_model.plan.runs) == len(model.schedule)
    # what ran, not only what was planned: the forward really contains a loop
    assert " scan[" in str(jax.make_jaxpr(lambda m: m.forward(tokens))(model))
    np.testing.assert_allclose(scanned, unrolled, atol=loss_atol, rtol=0)
    # Same parameter tree (checkpoints do not change), gradients equal up to summation order.
    assert jax.tree.structure(grads) == jax.tree.structure(unrolled_grads)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(unrolled_grads)):
        assert a.shape == b.shape
        if grad_relative_norm is None:
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
        else:  # bfloat16: elementwise differences sit at its resolution; compare whole tensors
            assert np.linalg.norm(a - b) <= grad_relative_norm * np.linalg.norm(b)
    return aux, unrolled_aux


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_identical_layers_give_the_unrolled_loss_exactly(remat):
    config = load_config_file("configs/tiny_btlm.py")
    config.model.remat_policy = remat
    _compare_scanned_with_unrolled(config, loss_atol=0.0)


def test_bfloat16_layers_stacked_in_their_compute_dtype_give_the_unrolled_loss():
    """Linear kernels are stacked in bfloat16 (the layer casts them anyway). XLA fuses bfloat16
    work inside a loop body differently from unrolled code, so agreement is to float32 rounding
    of the loss (~3e-6 relative here), far below bfloat16's resolution (8e-3)."""
    config = load_config_file("configs/tiny_btlm.py")
    config.model.compute_dtype = "bfloat16"
    config.model.remat_policy = "full"
    _compare_scanned_with_unrolled(config, loss_atol=1e-4, grad_relative_norm=3e-2)


def test_scanned_moe_layers_keep_each_layer_aux_terms():
    config = load_config_file("configs/tiny_moe.py")
    config.model.remat_policy = "full"
    aux, unrolled_aux = _compare_scanned_with_unrolled(config, loss_atol=0.0)
    assert sorted(aux["metrics"]) == sorted(unrolled_aux["metrics"])
    assert any(name.startswith("layer3/") for name in aux["metrics"])
    for name, value in unrolled_aux["metrics"].items():
        np.testing.assert_allclose(aux["metrics"][name], value, atol=1e-6, rtol=0)
    assert aux["losses"].keys() == unrolled_aux["losses"].keys()
    for name, (value, weight) in unrolled_aux["losses"].items():
        assert aux["losses"][name][1] == weight
        np.testing.assert_allclose(aux["losses"][name][0], value, atol=1e-6, rtol=0)


def test_padded_ffn_runs_give_the_unrolled_loss_and_gradients():
    config = load_config_file("configs/tiny.py")
    config.model.scan_padding = 0.5  # layers 0-1 and 2-3 (equal heads) share bodies
    config.model.remat_policy = "full"
    _compare_scanned_with_unrolled(config, loss_atol=2e-6)


def test_a_padded_scanned_openelm_equals_mlx_lm():
    """The 1.1B head/FFN schedule, scaled down (tests/model_helpers.py), in 10 padded runs."""
    config, model = small_model("1_1b", seed=3, scan_padding=0.1)
    assert len(model.plan.runs) <= 10
    twin = mlx_twin(model, config.model)
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 30))
    np.testing.assert_allclose(forward(model, tokens), mlx_logits(twin, tokens), atol=1e-4, rtol=0)


def test_lora_models_run_their_layers_one_by_one_and_match():
    """Adapters carry a per-layer index (their dropout stream), so blocks differ in structure."""
    config = with_adapters(load_config_file("configs/tiny_btlm.py"))
    config.model.adapter.dropout = 0.0
    assert plan_for(config.model).runs == ((0,), (1,), (2,), (3,))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 16)), jnp.int32)
    config.model.scan_layers = False
    unrolled = build_model(config.model, seed=1)(tokens)
    config.model.scan_layers = True
    np.testing.assert_array_equal(build_model(config.model, seed=1)(tokens), unrolled)


def test_padding_outside_zero_to_one_is_refused():
    config = family_config("openelm")
    config.model.scan_padding = 1.5
    with pytest.raises(ConfigError, match=r"model.scan_padding.*is 1.5; need a fraction"):
        validate(config)


def test_moe_experts_and_linear_kernels_are_stacked_in_the_compute_dtype():
    """Modules declare what they cast before use (`cast_before_use`); scanned runs stack those
    in the compute dtype: OLMoE's expert banks as well as every Linear kernel."""
    from elmjax.layers.scan import _compute_dtypes

    config = load_config_file("configs/tiny_moe.py")
    config.model.compute_dtype = "bfloat16"
    dtypes = _compute_dtypes(build_model(config.model, seed=0).layers[0])
    assert dtypes[("ffn", "experts", "gate_up")] == jnp.bfloat16
    assert dtypes[("ffn", "experts", "down")] == jnp.bfloat16
    assert dtypes[("attn", "qkv_proj", "kernel")] == jnp.bfloat16
    assert ("ffn", "router", "kernel") not in dtypes  # routing runs in float32
