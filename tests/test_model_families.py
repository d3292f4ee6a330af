"""A model family defined outside elmjax plugs in through the registry alone: it builds, trains
with the real trainer, counts its (trainable) parameters and reports its FLOPs, and its
auxiliary losses are weighted into the training loss and logged."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax import models, trainable
from elmjax.config import ConfigError, family_config, validate
from elmjax.layers.decoder import abstract_model, build_model
from elmjax.layers.linear import Linear
from elmjax.models.family import LayerSpec, ModelFamily
from elmjax.training import metrics as mt
from elmjax.training import step as ts
from elmjax.validation import require
from tests.train_micro_config import synthetic_batch

AUX_WEIGHT = 0.5


class Buffer(nnx.Variable):
    """A variable that is not an `nnx.Param`, so the default trainable filter freezes it."""


class GeluMLP(nnx.Module):
    """`down(gelu(up(x)) * gain)` with a frozen per-unit `gain` (ones), reporting the mean
    squared activation as an auxiliary loss and its largest magnitude as a metric."""

    has_aux = True

    def __init__(self, model_dim, ffn_dim, *, init, aux_weight):
        common = dict(use_bias=False, compute_dtype=jnp.float32, param_dtype=jnp.float32)
        self.up = Linear(model_dim, ffn_dim, init=init.linear(model_dim), logical_axes=("embed", "mlp"), **common)
        self.down = Linear(ffn_dim, model_dim, init=init.output_projection(), logical_axes=("mlp", "embed"), **common)
        self.gain = Buffer(jnp.zeros((ffn_dim,)), out_sharding=("mlp",), eager_sharding=False, init=("ones",))
        self.aux_weight = aux_weight

    def __call__(self, x):
        hidden = jax.nn.gelu(self.up(x)) * self.gain[...]
        aux = {
            "losses": {"activation_l2": (jnp.mean(jnp.square(hidden)), self.aux_weight)},
            "metrics": {"activation_max": jnp.max(jnp.abs(hidden))},
        }
        return self.down(hidden), aux


class TinyGelu(ModelFamily):
    """Uniform layers of `num_heads` heads (no GQA) and a GELU MLP of width `ffn_dim`."""

    name = "tiny_gelu_test"
    aux_weight = AUX_WEIGHT

    def model_fields(self):
        return {"num_heads": 2, "ffn_dim": 64}

    def validate(self, model_config):
        require(
            model_config.num_heads * model_config.head_dim == model_config.model_dim,
            "model.num_heads",
            f"{model_config.num_heads} heads of {model_config.head_dim} do not make model_dim",
        )

    def layer_specs(self, model_config):
        spec = LayerSpec(model_config.num_heads, model_config.num_heads, model_config.ffn_dim)
        return [spec] * model_config.num_layers

    def feed_forward(self, model_config, spec, init):
        return GeluMLP(model_config.model_dim, spec.ffn_dim, init=init, aux_weight=self.aux_weight)

    def layer_matmul_params(self, model_config, spec):
        d = model_config.model_dim
        return 3 * d * d + d * d + 2 * d * spec.ffn_dim  # qkv, out, up, down


class TinyGeluWithoutAuxLoss(TinyGelu):
    name = "tiny_gelu_test_no_aux"
    aux_weight = 0.0


models.register(TinyGelu())
models.register(TinyGeluWithoutAuxLoss())

D, L, F, V = 32, 2, 64, 512


def tiny_gelu_config(family="tiny_gelu_test"):
    config = family_config(
        family, num_layers=L, model_dim=D, head_dim=16, num_heads=2, ffn_dim=F, vocab_size=V,
        max_seq_len=32, qk_norm="none", peak_lr=1e-2,
    )
    config.train.steps, config.train.batch_size, config.train.seq_len = 3, 8, 32
    config.train.log_every, config.train.sample_at_end = 1, False
    config.optim.warmup_steps = 1
    config.checkpoint.every_steps, config.checkpoint.async_save = 3, False
    config.eval.every_steps = 0
    return validate(config)


def test_registered_family_validates_its_own_fields():
    config = tiny_gelu_config()
    config.model.num_heads = 3
    with pytest.raises(ConfigError, match="`model.num_heads`: 3 heads of 16 do not make model_dim"):
        validate(config)


def test_registered_family_counts_its_parameters_and_frozen_buffers():
    config = tiny_gelu_config()
    per_layer = 2 * D + 3 * D * D + D * D + 2 * D * F  # two norms, qkv, out, up, down
    expected_trainable = V * D + L * per_layer + D  # tied embedding, layers, final norm
    assert trainable.count(abstract_model(config.model), config.model) == (expected_trainable, expected_trainable + L * F)


def test_registered_family_reports_spec_flops():
    config = tiny_gelu_config()
    seq = config.train.seq_len
    matmuls = L * (4 * D * D + 2 * D * F)
    attention = L * 6 * seq * 2 * 16  # SPEC §4: 6 * seq * q_heads * head_dim per layer
    assert mt.flops_per_token(config.model, seq) == 6 * matmuls + attention + 6 * V * D


def test_aux_loss_enters_the_loss_with_its_weight():
    """Same weights, same batch: the family with the aux weight reports exactly weight x the
    aux term more loss than its twin with weight 0, and the same cross-entropy."""
    batch = synthetic_batch(tiny_gelu_config())
    results = {}
    for family in ("tiny_gelu_test", "tiny_gelu_test_no_aux"):
        config = tiny_gelu_config(family)
        graphdef, params, frozen = trainable.split(build_model(config.model, seed=0), config.model)
        results[family] = ts.loss_and_grads(
            nnx.to_pure_dict(params), nnx.to_pure_dict(frozen), graphdef, batch, z_loss_weight=1e-4, accum_steps=1
        )
    loss, ce, z, aux, _ = results["tiny_gelu_test"]
    loss0, ce0, _, aux0, _ = results["tiny_gelu_test_no_aux"]
    assert float(ce) == float(ce0)
    assert float(aux["activation_l2"]) == float(aux0["activation_l2"]) > 0
    assert float(loss) == pytest.approx(float(ce + z) + AUX_WEIGHT * float(aux["activation_l2"]), rel=1e-6)
    assert float(loss) - float(loss0) == pytest.approx(AUX_WEIGHT * float(aux["activation_l2"]), rel=1e-5)
    assert set(aux) == {"activation_l2", "layer0/activation_max", "layer1/activation_max"}


def test_aux_loss_is_the_same_with_gradient_accumulation():
    config = tiny_gelu_config()
    graphdef, params, frozen = trainable.split(build_model(config.model, seed=0), config.model)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    batch = synthetic_batch(config)
    one = ts.loss_and_grads(params, frozen, graphdef, batch, z_loss_weight=1e-4, accum_steps=1)
    two = ts.loss_and_grads(params, frozen, graphdef, batch, z_loss_weight=1e-4, accum_steps=2)
    # Aux losses are means over a micro-batch: accumulation averages them over micro-batches.
    halves = [
        ts.loss_and_grads(params, frozen, graphdef, {k: v[i::2] for k, v in batch.items()},
                          z_loss_weight=1e-4, accum_steps=1)[3]["activation_l2"]
        for i in range(2)
    ]
    assert float(two[3]["activation_l2"]) == pytest.approx(float(np.mean(halves)), rel=1e-6)
    assert float(one[1]) == pytest.approx(float(two[1]), rel=1e-6)


def test_registered_family_trains_with_the_real_trainer_and_logs_aux_terms(tmp_path):
    import orbax.checkpoint as ocp

    from elmjax.training.checkpoint import restore_params
    from elmjax.training.loop import train
    from elmjax.tree import path_name

    config = tiny_gelu_config()
    train(config, tmp_path, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert np.isfinite(record["loss"])
        assert record["loss"] == pytest.approx(
            record["ce_loss"] + record["z_loss"] + AUX_WEIGHT * record["aux/activation_l2"], rel=1e-5
        )
        assert record["aux/layer0/activation_max"] > 0 and record["aux/layer1/activation_max"] > 0
    metadata = ocp.PyTreeCheckpointer().metadata((tmp_path / "checkpoints" / "3" / "state").absolute()).item_metadata
    saved = [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(
        metadata.tree, is_leaf=lambda x: hasattr(x, "shape"))]
    assert not any("gain" in path for path in saved)  # frozen: neither in params nor in optimizer state
    assert any(path.startswith("opt_state/") and path.endswith("layers/0/ffn/up/kernel") for path in saved)
    _, params = restore_params(tmp_path)  # export's reader adds the frozen buffers back
    np.testing.assert_array_equal(params["layers"][0]["ffn"]["gain"], np.ones(F, np.float32))
