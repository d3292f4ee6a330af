"""elmjax's OpenELM equals mlx-lm's `openelm` model (an implementation no one here wrote).

Every batch here is [2, 30], so each variant compiles its forward once.
"""
import numpy as np
import pytest

from elmjax.models.openelm.layerwise import schedule_from_config
from model_helpers import VARIANTS, forward, mlx_logits, mlx_twin, packed_rows, small_model

TOLERANCE = 1e-4  # float32, absolute, on logits of magnitude ~1-5
SEQ = 30


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def twins(request):
    config, model = small_model(request.param, seed=3)
    return request.param, config, model, mlx_twin(model, config.model)


def test_scaled_variant_keeps_the_variant_head_schedule(twins):
    from test_openelm_layerwise import SPEC_SCHEDULES

    variant, config, _, _ = twins
    schedule = schedule_from_config(config.model)
    assert [s.num_query_heads for s in schedule] == SPEC_SCHEDULES[variant][0]
    assert [s.num_kv_heads for s in schedule] == SPEC_SCHEDULES[variant][1]


def test_logits_equal_mlx_lm(twins):
    _, _, model, twin = twins
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, SEQ))
    np.testing.assert_allclose(forward(model, tokens), mlx_logits(twin, tokens), atol=TOLERANCE, rtol=0)


def test_padded_batch_logits_equal_mlx_lm_on_unpadded_rows(twins):
    _, _, model, twin = twins
    rng = np.random.default_rng(1)
    lengths = [SEQ, 11]
    tokens = np.zeros((2, SEQ), np.int32)
    segment_ids = np.zeros((2, SEQ), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(0, 512, size=length)
        segment_ids[row, :length] = 1  # 0 marks right padding
    ours = forward(model, tokens, segment_ids)
    for row, length in enumerate(lengths):
        expected = mlx_logits(twin, tokens[row : row + 1, :length])[0]
        np.testing.assert_allclose(ours[row, :length], expected, atol=TOLERANCE, rtol=0)


def test_packed_row_logits_equal_mlx_lm_on_each_document(twins):
    _, _, model, twin = twins
    rng = np.random.default_rng(2)
    # document lengths; row 0 ends in 3 padding tokens
    tokens, segment_ids, positions, documents = packed_rows([[9, 14, 4], [5, 25]], SEQ, 512, rng)
    ours = forward(model, tokens, segment_ids, positions)
    for row, start, document in documents:
        expected = mlx_logits(twin, document[None])[0]
        np.testing.assert_allclose(ours[row, start : start + len(document)], expected, atol=TOLERANCE, rtol=0)
