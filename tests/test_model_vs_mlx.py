"""elmjax's OpenELM equals mlx-lm's `openelm` model (an implementation no one here wrote)."""
import jax.numpy as jnp
import numpy as np
import pytest

from elmjax.scaling import schedule_from_config
from model_helpers import VARIANTS, mlx_logits, mlx_twin, small_model

TOLERANCE = 1e-4  # float32, absolute, on logits of magnitude ~1-5


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def twins(request):
    config, model = small_model(request.param, seed=3)
    return request.param, config, model, mlx_twin(model, config.model)


def test_scaled_variant_keeps_the_variant_head_schedule(twins):
    from test_scaling import SPEC_SCHEDULES

    variant, config, _, _ = twins
    schedule = schedule_from_config(config.model)
    assert [s.num_query_heads for s in schedule] == SPEC_SCHEDULES[variant][0]
    assert [s.num_kv_heads for s in schedule] == SPEC_SCHEDULES[variant][1]


def test_logits_equal_mlx_lm(twins):
    _, _, model, twin = twins
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 23))
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, mlx_logits(twin, tokens), atol=TOLERANCE, rtol=0)


def test_padded_batch_logits_equal_mlx_lm_on_unpadded_rows(twins):
    _, _, model, twin = twins
    rng = np.random.default_rng(1)
    lengths = [19, 11]
    tokens = np.zeros((2, 19), np.int32)
    segment_ids = np.zeros((2, 19), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(0, 512, size=length)
        segment_ids[row, :length] = 1  # 0 marks right padding
    ours = np.asarray(model(jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids)))
    for row, length in enumerate(lengths):
        expected = mlx_logits(twin, tokens[row : row + 1, :length])[0]
        np.testing.assert_allclose(ours[row, :length], expected, atol=TOLERANCE, rtol=0)


def test_packed_row_logits_equal_mlx_lm_on_each_document(twins):
    _, _, model, twin = twins
    rng = np.random.default_rng(2)
    documents = [rng.integers(0, 512, size=n) for n in (9, 14, 4)]
    tokens = np.concatenate(documents + [np.zeros(3, np.int64)])[None]  # 3 padding tokens
    segment_ids = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(documents)] + [np.zeros(3)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in documents] + [np.zeros(3)])[None]
    ours = np.asarray(
        model(jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids, jnp.int32),
              positions=jnp.asarray(positions, jnp.int32))
    )[0]
    start = 0
    for document in documents:
        expected = mlx_logits(twin, document[None])[0]
        np.testing.assert_allclose(ours[start : start + len(document)], expected, atol=TOLERANCE, rtol=0)
        start += len(document)
