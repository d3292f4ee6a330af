"""The loss and the optimizer step: CE + z-loss over loss tokens, accumulation, non-finite."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elmjax import trainable
from elmjax.training import optim
from elmjax.training import step as ts
from elmjax.layers.decoder import build_model
from tests.train_micro_config import get_config, synthetic_batch


@pytest.fixture(scope="module")
def setup():
    config = get_config()
    model = build_model(config.model, 0)
    graphdef, params, frozen = trainable.split(model, config.model)
    assert not jax.tree.leaves(frozen)  # every parameter trains
    return config, model, graphdef, nnx.to_pure_dict(params)


def reference_loss(logits, targets, mask, z_weight):
    """numpy float64: mean over masked tokens of (-log_softmax[target] + z * lse^2)."""
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((ce + z_weight * lse**2) * mask).sum() / mask.sum(), (ce * mask).sum() / mask.sum()


def test_loss_is_mean_ce_plus_z_loss_over_loss_mask_tokens(setup):
    config, model, graphdef, params = setup
    batch = synthetic_batch(config)
    batch["loss_mask"][:, -5:] = 0.0  # e.g. padding at the end of each row
    logits = model(jnp.asarray(batch["inputs"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                   positions=jnp.asarray(batch["positions"]))
    expected_total, expected_ce = reference_loss(logits, batch["targets"], batch["loss_mask"], 1e-4)
    loss, ce, z, _, _ = ts.loss_and_grads(params, {}, graphdef, batch, z_loss_weight=1e-4, accum_steps=1)
    assert float(loss) == pytest.approx(expected_total, rel=1e-5)
    assert float(ce) == pytest.approx(expected_ce, rel=1e-5)
    assert float(z) > 0


def test_masked_tokens_do_not_change_loss_or_gradients(setup):
    config, _, graphdef, params = setup
    batch = synthetic_batch(config)
    batch["loss_mask"][:, :4] = 0.0
    changed = {k: v.copy() for k, v in batch.items()}
    changed["targets"][:, :4] = (changed["targets"][:, :4] + 7) % config.model.vocab_size
    first = ts.loss_and_grads(params, {}, graphdef, batch, z_loss_weight=1e-4, accum_steps=1)
    second = ts.loss_and_grads(params, {}, graphdef, changed, z_loss_weight=1e-4, accum_steps=1)
    assert float(first[0]) == float(second[0])
    jax.tree.map(np.testing.assert_array_equal, first[4], second[4])


def test_gradient_accumulation_matches_one_big_batch(setup):
    config, _, graphdef, params = setup
    batch = synthetic_batch(config, documents_per_row=3)
    batch["loss_mask"][::3, 10:] = 0.0  # uneven token counts across micro-batches
    one = ts.loss_and_grads(params, {}, graphdef, batch, z_loss_weight=1e-4, accum_steps=1)
    four = ts.loss_and_grads(params, {}, graphdef, batch, z_loss_weight=1e-4, accum_steps=4)
    assert float(four[0]) == pytest.approx(float(one[0]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), one[4], four[4])


def test_the_head_in_sequence_pieces_gives_the_same_loss_and_gradients(setup):
    """`model.logit_chunks`: 3 uneven pieces; the oracle is the float64 numpy loss."""
    config, model, _, params = setup
    chunked = config.copy_and_resolve_references()
    chunked.model.logit_chunks = 3
    graphdef, _, _ = trainable.split(build_model(chunked.model, 0), chunked.model)
    batch = synthetic_batch(config)
    logits = model(jnp.asarray(batch["inputs"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                   positions=jnp.asarray(batch["positions"]))
    expected_total, _ = reference_loss(logits, batch["targets"], batch["loss_mask"], 1e-4)
    whole = ts.loss_and_grads(params, {}, setup[2], batch, z_loss_weight=1e-4, accum_steps=1)
    pieces = ts.loss_and_grads(params, {}, graphdef, batch, z_loss_weight=1e-4, accum_steps=1)
    assert float(pieces[0]) == pytest.approx(expected_total, rel=1e-5)
    assert float(pieces[0]) == pytest.approx(float(whole[0]), rel=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), whole[4], pieces[4])


def _step(config, graphdef, clip_norm=1.0):
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    step = jax.jit(lambda state, batch: ts.train_step(
        state, {}, batch, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
        z_loss_weight=1e-4, accum_steps=1, clip_norm=clip_norm))
    return optimizer, step


def test_train_step_updates_params_and_reports_metrics(setup):
    config, _, graphdef, params = setup
    optimizer, step = _step(config, graphdef)
    state = ts.init_train_state(params, optimizer)
    new_state, metrics = step(state, synthetic_batch(config))
    assert int(new_state["step"]) == 1 and bool(metrics["finite"])
    assert float(metrics["lr"]) == pytest.approx(config.optim.init_lr, rel=1e-4)
    assert float(metrics["grad_norm"]) > 0
    assert not np.array_equal(new_state["params"]["token_embeddings"], params["token_embeddings"])


def test_nonfinite_loss_skips_the_update_and_is_counted(setup):
    config, _, graphdef, params = setup
    optimizer, step = _step(config, graphdef)
    state = ts.init_train_state(params, optimizer)
    batch = synthetic_batch(config)
    batch["loss_mask"][0, 0] = np.nan
    new_state, metrics = step(state, batch)
    assert not bool(metrics["finite"])
    assert int(new_state["nonfinite_steps"]) == 1 and int(new_state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state["params"], params)
    jax.tree.map(np.testing.assert_array_equal, new_state["opt_state"], state["opt_state"])


def test_train_step_clips_gradients_to_global_norm_before_adam(setup):
    """b1 = b2 = 0 and eps = 1 make Adam's update -lr * g / (|g| + 1), which depends on the
    gradient's scale, so the clip shows in the new parameters; grad_norm is the norm before
    clipping."""
    config, _, graphdef, params = setup
    config = config.copy_and_resolve_references()
    config.optim.update(peak_lr=1.0, init_lr=1.0, warmup_steps=0, schedule="constant",
                        weight_decay=0.0, b1=0.0, b2=0.0, eps=1.0)
    batch = synthetic_batch(config)
    _, _, _, _, grads = ts.loss_and_grads(params, {}, graphdef, batch, z_loss_weight=1e-4, accum_steps=1)
    norm = float(optax.tree.norm(grads))
    clip_norm = norm / 4
    optimizer, step = _step(config, graphdef, clip_norm=clip_norm)
    new_state, metrics = step(ts.init_train_state(params, optimizer), batch)
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    clipped = np.asarray(grads["token_embeddings"]) * (clip_norm / norm)
    expected = np.asarray(params["token_embeddings"]) - clipped / (np.abs(clipped) + 1.0)
    np.testing.assert_allclose(new_state["params"]["token_embeddings"], expected, rtol=1e-5, atol=1e-6)
