"""KV-cache decoding (elmjax/inference/generate.py, elmjax/layers/kv_cache.py) against full recomputation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tiny import get_config
from elmjax.inference import generate as gen
from elmjax.config import validate
from elmjax.layers.kv_cache import init_cache
from elmjax.layers.decoder import build_model
from elmjax.models.openelm.layerwise import schedule_from_config

# Ragged on purpose: 5, 2 and 19 tokens (the longest crosses a 16-token length bucket).
PROMPTS = [
    [1, 5, 9, 200, 33],
    [1, 7],
    [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117],
]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_config():
    return validate(get_config()).model


@pytest.fixture(scope="module")
def model(model_config):
    return build_model(model_config, seed=0)


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def full_logits(model, sequence, length=32):
    """Logits [len(sequence), vocab] of one unpadded row, computed by the training forward.

    The row is right-padded to a fixed `length` so one compilation serves every call; causal
    attention keeps the padding after the row from touching its logits.
    """
    tokens = np.zeros((1, length), np.int32)
    tokens[0, : len(sequence)] = sequence
    return _full_forward(*nnx.split(model), jnp.asarray(tokens))[0, : len(sequence)]


def greedy_by_full_recompute(model, prompt, steps):
    """The oracle: run the whole sequence through the model again for every new token."""
    sequence, new = list(prompt), []
    for _ in range(steps):
        token = int(jnp.argmax(full_logits(model, sequence)[-1]))
        new.append(token)
        sequence.append(token)
    return new


def test_cached_greedy_decoding_equals_full_recompute_for_ragged_batch(model, model_config):
    expected = [greedy_by_full_recompute(model, p, NEW_TOKENS) for p in PROMPTS]
    got = gen.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, max_seq_len=model_config.max_seq_len)
    assert got == expected


@functools.partial(jax.jit, static_argnums=0)
def _cached_forward(graphdef, state, tokens, segment_ids, positions, cache):
    return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, positions=positions, cache=cache)


def test_cached_logits_equal_full_forward_logits_at_every_step(model):
    """Prefill a left-padded batch, then feed one token per call: the logits of each call equal
    the full forward's logits at that position of the unpadded row."""
    graphdef, state = nnx.split(model)
    tokens, segment_ids, positions = gen.left_pad(PROMPTS, pad_id=0, length=20)
    extra = np.array([[11, 12, 13]] * len(PROMPTS), np.int32)  # three decode steps
    cache = init_cache(model.schedule, len(PROMPTS), 32, model.head_dim, jnp.float32)
    logits, cache = _cached_forward(graphdef, state, tokens, segment_ids, positions, cache)
    step_logits = [logits[:, -1]]
    for step in range(extra.shape[1]):
        position = np.asarray([[len(p) + step] for p in PROMPTS], np.int32)
        ones = np.ones_like(position)
        logits, cache = _cached_forward(graphdef, state, extra[:, step : step + 1], ones, position, cache)
        step_logits.append(logits[:, 0])
    assert int(cache.index) == 20 + extra.shape[1]
    for row, prompt in enumerate(PROMPTS):
        full = full_logits(model, prompt + extra[row].tolist())
        for step, got in enumerate(step_logits):
            np.testing.assert_allclose(got[row], full[len(prompt) - 1 + step], rtol=1e-4, atol=1e-4)


def test_cache_buffers_follow_each_layers_kv_head_count(model_config):
    schedule = schedule_from_config(model_config)
    cache = init_cache(schedule, batch=2, max_len=24, head_dim=model_config.head_dim, dtype=jnp.float32)
    shapes = [layer.key.shape for layer in cache.layers]
    assert shapes == [(2, 24, spec.num_kv_heads, model_config.head_dim) for spec in schedule]
    assert len({shape[2] for shape in shapes}) > 1  # the tiny config's layers really differ


def test_a_row_decodes_the_same_alone_and_beside_longer_padded_rows(model):
    alone = gen.generate(model, [PROMPTS[1]], max_new_tokens=NEW_TOKENS)
    batched = gen.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    assert batched[1] == alone[0]


def test_decoding_stops_at_eos_per_row(model):
    full = gen.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    eos = full[2][3]  # the 4th token of the last row becomes "EOS"
    stopped = gen.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=eos)
    for row, tokens in zip(full, stopped):
        expected = row[: row.index(eos)] if eos in row else row
        assert tokens == expected
    assert stopped[2] == full[2][: full[2].index(eos)]


def test_top_k_one_sampling_is_greedy(model):
    greedy = gen.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    sampled = gen.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=1, seed=3)
    assert sampled == greedy


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(model):
    kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95)
    first = gen.generate(model, PROMPTS, seed=7, **kwargs)
    assert gen.generate(model, PROMPTS, seed=7, **kwargs) == first
    assert gen.generate(model, PROMPTS, seed=8, **kwargs) != first


def test_sample_logits_keeps_only_the_top_k_tokens():
    logits = jnp.tile(jnp.asarray([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8]]), (512, 1))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    tokens = jax.jit(gen.sample_logits)(logits, keys, jnp.float32(1.0), jnp.int32(3), jnp.float32(1.0))
    assert set(np.asarray(tokens).tolist()) == {1, 3, 5}


def test_sample_logits_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8).
    logits = jnp.log(jnp.tile(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]), (512, 1)))
    tokens = jax.jit(gen.sample_logits)(
        logits, jax.random.key(1), jnp.float32(1.0), jnp.int32(0), jnp.float32(0.7)
    )
    assert set(np.asarray(tokens).tolist()) == {1, 3}


def test_prompt_longer_than_the_context_is_refused_with_the_lengths(model):
    with pytest.raises(gen.PromptTooLongError, match=r"prompt 1 has 300 tokens.*310 > .*256"):
        gen.generate(model, [[1, 2], [1] * 300], max_new_tokens=10, max_seq_len=256)


def test_empty_prompt_list_generates_nothing(model):
    assert gen.generate(model, [], max_new_tokens=5) == []


def test_alibi_model_cached_decoding_equals_full_recompute():
    config = get_config()
    config.model.position_encoding = "alibi"
    config.model.num_layers = 2
    model = build_model(validate(config).model, seed=1)
    prompts = PROMPTS[:2]
    expected = [greedy_by_full_recompute(model, p, 4) for p in prompts]
    assert gen.generate(model, prompts, max_new_tokens=4) == expected


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    from elmjax.training.checkpoint import save_params_checkpoint

    workdir = tmp_path_factory.mktemp("tiny_generate")
    save_params_checkpoint(workdir, validate(get_config()), nnx.state(model, nnx.Param))
    return workdir


def test_cli_prints_each_prompt_with_its_greedy_continuation(checkpoint, model, capsys):
    from elmjax.data.tokenizer_choice import load_tokenizer

    tokenizer = load_tokenizer(validate(get_config()))
    code = gen.main(["--checkpoint", str(checkpoint), "--prompt", "And God said", "--prompt", "To be",
                     "--max_new_tokens", str(NEW_TOKENS)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [p + gen.sample_text(model, tokenizer, p, NEW_TOKENS) for p in ("And God said", "To be")]
    assert "\n".join(lines) == "\n".join(expected)


def test_cli_refuses_a_prompt_longer_than_the_context(checkpoint, capsys):
    code = gen.main(["--checkpoint", str(checkpoint), "--prompt", "word " * 400, "--max_new_tokens", "4"])
    assert code == 2
    assert "the model's context of 256 tokens" in capsys.readouterr().err


def test_continuation_text_keeps_the_space_before_the_first_new_word():
    from elmjax.data.tokenizer_choice import load_tokenizer

    tokenizer = load_tokenizer(validate(get_config()))
    prompt, new = tokenizer.encode("In the"), tokenizer.encode("In the beginning")[len(tokenizer.encode("In the")):]
    assert tokenizer.decode(new) == "beginning"  # why continuation_text exists
    assert gen.continuation_text(tokenizer, prompt, new) == " beginning"


def test_reading_a_checkpoint_logs_no_orbax_item_metadata_warning(checkpoint, caplog):
    import logging

    from elmjax.training.checkpoint import load_model

    with caplog.at_level(logging.WARNING):
        load_model(checkpoint)
    assert "Metadata file does not exist" not in caplog.text


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top_p", "nan"),
                                         ("--temperature", "-1")])
def test_cli_refuses_sampling_values_that_are_not_numbers_in_range(flag, value, capsys):
    # NaN passed the old `temperature < 0` check and sampled garbage
    with pytest.raises(SystemExit) as exit_:
        gen.main(["--checkpoint", "/nonexistent", "--prompt", "The", flag, value])
    assert exit_.value.code == 2
    assert "need --top_k >= 0, 0 < --top_p <= 1 and a finite --temperature >= 0" in capsys.readouterr().err


def test_cli_without_a_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        gen.main(["--checkpoint", "/nonexistent"])
    assert exit_.value.code == 2 and "no --prompt given" in capsys.readouterr().err
