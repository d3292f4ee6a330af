"""Loss masking of chat batches: system/user tokens add no loss term, so their gradient is
exactly zero, and changing what a user turn says changes the loss only through the context
the assistant's tokens see (elmjax/training/step.py's loss on a real chat batch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.config import openelm_config, validate
from elmjax.data import pipeline
from elmjax.layers.decoder import build_model
from elmjax.training import step as ts


@pytest.fixture(scope="module")
def setup():
    config = openelm_config(num_layers=2, model_dim=64, head_dim=16, peak_lr=1e-3,
                            ffn_dim_divisor=16, vocab_size=4096, max_seq_len=64)
    config.train.seq_len, config.train.batch_size = 64, 2
    config.data.source, config.data.chat_template = "embedded:chat", "openelm"
    config = validate(config)
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    model = build_model(config.model, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    return config, {k: jnp.asarray(v) for k, v in batch.items()}, graphdef, nnx.to_pure_dict(params)


def loss_and_grads(graphdef, params, batch):
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: ts.summed_loss(p, {}, graphdef, b, 1e-4)[0]))
    return grad_fn(params, batch)


def test_masked_positions_have_exactly_zero_logit_gradient(setup):
    config, batch, graphdef, params = setup
    mask = batch["loss_mask"]
    assert 0 < float(mask.mean()) < 1  # both assistant and non-assistant targets in the batch
    logits = jax.random.normal(jax.random.key(0), (*mask.shape, config.model.vocab_size))

    def loss_of_logits(logits):
        ce, z = ts.token_losses(logits, batch["targets"], 1e-4)
        return jnp.sum((ce + z) * mask) / jnp.sum(mask)

    grad = np.asarray(jax.grad(loss_of_logits)(logits))
    per_position = np.abs(grad).sum(-1)
    masked = np.asarray(mask) == 0
    assert np.all(per_position[masked] == 0.0)  # exactly zero, not just small
    assert np.all(per_position[~masked] > 0)


def test_user_targets_do_not_enter_the_loss_or_its_gradient(setup):
    _, batch, graphdef, params = setup
    loss, grads = loss_and_grads(graphdef, params, batch)
    masked = batch["loss_mask"] == 0
    # Other tokens as the "targets" of every system/user/header position: nothing changes.
    changed = dict(batch, targets=jnp.where(masked, (batch["targets"] + 7) % 4096, batch["targets"]))
    loss2, grads2 = loss_and_grads(graphdef, params, changed)
    assert float(loss) == float(loss2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_user_inputs_act_as_context(setup):
    _, batch, graphdef, params = setup
    mask, segments = np.asarray(batch["loss_mask"]), np.asarray(batch["segment_ids"])
    # A masked input (a user/header token) with an assistant target after it in its conversation:
    # it reaches the loss, but only as context those assistant predictions attend to.
    row, position = next(
        (r, p) for r in range(mask.shape[0]) for p in np.flatnonzero(mask[r] == 0)
        if segments[r, p] > 0 and np.any((mask[r, p + 1:] > 0) & (segments[r, p + 1:] == segments[r, p]))
    )
    inputs = np.asarray(batch["inputs"]).copy()
    inputs[row, position] = (inputs[row, position] + 11) % 4096
    loss, _ = loss_and_grads(graphdef, params, batch)
    loss2, _ = loss_and_grads(graphdef, params, dict(batch, inputs=jnp.asarray(inputs)))
    assert float(loss) != float(loss2)
