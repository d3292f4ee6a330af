"""BTLM at inference: cached decoding past the training length (with and without
`alibi_scaling`) against full recomputation, the Pallas kernel's ALiBi and muP scale in the
model, and lm-eval scoring (elmjax.evaluate) against the PyTorch reference of SPEC §3."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from elmjax.config import validate
from elmjax.convert.export import export_params
from elmjax.data.tokenizer import open_tokenizer
from elmjax.inference import evaluate as ev
from elmjax.inference.generate import generate
from elmjax.layers.decoder import Transformer
from elmjax.layers.kv_cache import init_cache
from tests.test_btlm import random_btlm_params, reference_btlm_logits, small_config

TRAIN_LEN = 16  # the "training length" the decoding goes past
MAX_LEN = 64  # the model's context (n_positions)
PROMPT, TOTAL = 20, 40


def btlm_model(num_layers=2, vocab_size=96, **scaling):
    config = small_config(num_layers=num_layers, vocab_size=vocab_size, max_seq_len=MAX_LEN, **scaling)
    config.train.seq_len = TRAIN_LEN
    model_config = validate(config).model
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config)))
    return model_config, nnx.merge(graphdef, random_btlm_params(model_config, seed=2))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _cached(graphdef, state, tokens, positions, cache):
    model = nnx.merge(graphdef, state)
    return model(tokens, segment_ids=jnp.ones_like(tokens), positions=positions, cache=cache)


def full_logits(model, tokens, pad_to=None) -> np.ndarray:
    """Logits [len, vocab] of one row by the training forward (no cache). `pad_to` right-pads
    the row so one compilation serves every length: causal attention keeps the padding from
    touching the row, unless dynamic ALiBi scaling counts the padded keys."""
    row = list(tokens) + [0] * ((pad_to or len(tokens)) - len(tokens))
    return np.asarray(_forward(*nnx.split(model), jnp.asarray([row], jnp.int32))[0, : len(tokens)])


def cached_logits(model, tokens, prefill: int) -> np.ndarray:
    """Logits [len, vocab] by cached decoding: a prefill of `prefill` tokens, then one token
    per call against the KV cache."""
    graphdef, state = nnx.split(model)
    cache = init_cache(model.schedule, 1, MAX_LEN, model.head_dim, jnp.float32)
    tokens = jnp.asarray([tokens], jnp.int32)
    logits, cache = _cached(graphdef, state, tokens[:, :prefill], jnp.arange(prefill)[None], cache)
    rows = [np.asarray(logits[0])]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = _cached(graphdef, state, tokens[:, t : t + 1], jnp.asarray([[t]]), cache)
        rows.append(np.asarray(logits[0]))
    return np.concatenate(rows)


SEQUENCE = np.random.default_rng(3).integers(0, 96, TOTAL).tolist()


@pytest.mark.parametrize("scaling", [{}, {"alibi_scaling_factor": 2.0}], ids=["unscaled", "factor"])
def test_cached_decoding_past_the_training_length_equals_full_recomputation(scaling):
    _, model = btlm_model(**scaling)
    cached = cached_logits(model, SEQUENCE, PROMPT)
    full = full_logits(model, SEQUENCE, pad_to=MAX_LEN)  # each position sees only its prefix
    np.testing.assert_allclose(cached, full, atol=1e-4)  # up to 2.5 x the training length


def test_dynamic_scaling_decodes_like_a_full_recomputation_of_each_length():
    """With alibi_train_seq_len N every call divides the slopes by key_len / N past N. A full
    forward of t tokens uses t / N for all of them; a cached step at length t uses t / N too,
    and with one layer the cached keys/values do not depend on the slopes, so each step equals
    the full recomputation of its prefix."""
    _, model = btlm_model(num_layers=1, alibi_train_seq_len=TRAIN_LEN)
    cached = cached_logits(model, SEQUENCE, PROMPT)
    for t in range(PROMPT, TOTAL + 1, 5):
        np.testing.assert_allclose(cached[t - 1], full_logits(model, SEQUENCE[:t])[-1], atol=1e-4, err_msg=str(t))
    _, unscaled = btlm_model(num_layers=1)
    short = SEQUENCE[:TRAIN_LEN]  # up to N keys nothing is scaled
    np.testing.assert_array_equal(full_logits(model, short), full_logits(unscaled, short))
    assert np.abs(full_logits(model, SEQUENCE)[-1] - full_logits(unscaled, SEQUENCE)[-1]).max() > 1e-3


def test_dynamic_scaling_prefill_equals_the_full_forward_with_several_layers():
    """Deeper layers' cached keys/values were computed under their own step's slopes (as in
    Cerebras' implementation), so only a prefill is a full recomputation."""
    _, model = btlm_model(alibi_train_seq_len=TRAIN_LEN)
    np.testing.assert_allclose(cached_logits(model, SEQUENCE, TOTAL), full_logits(model, SEQUENCE), atol=1e-4)


def greedy_by_full_recompute(model, prompt, steps):
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(np.argmax(full_logits(model, sequence, pad_to=MAX_LEN)[-1])))
    return sequence[len(prompt):]


@pytest.mark.parametrize("scaling", [{}, {"alibi_scaling_factor": 2.0}, {"alibi_train_seq_len": TRAIN_LEN}],
                         ids=["unscaled", "factor", "dynamic"])
def test_generate_runs_past_the_training_length(scaling):
    model_config, model = btlm_model(**scaling)
    prompts = [SEQUENCE[:PROMPT], SEQUENCE[:7]]  # ragged: left padding shifts slots, not distances
    new = generate(model, prompts, max_new_tokens=TOTAL - PROMPT, max_seq_len=model_config.max_seq_len)
    assert [len(tokens) for tokens in new] == [TOTAL - PROMPT] * 2
    if not scaling.get("alibi_train_seq_len"):  # cached == full recomputation (see above)
        assert new[0] == greedy_by_full_recompute(model, prompts[0], TOTAL - PROMPT)
        assert new[1] == greedy_by_full_recompute(model, prompts[1], TOTAL - PROMPT)


def test_pallas_attention_gives_the_xla_logits_with_alibi_and_mups_scale():
    model_config, model = btlm_model()
    tokens = SEQUENCE[:32]
    config = small_config(max_seq_len=MAX_LEN, attention_impl="pallas")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(validate(config).model)))
    pallas = nnx.merge(graphdef, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(full_logits(pallas, tokens), full_logits(model, tokens), atol=1e-4)


def test_lm_eval_scores_equal_the_pytorch_reference_of_the_exported_model(tmp_path):
    """elmjax.evaluate's loglikelihood of (context, continuation) pairs, with the GPT-2
    tokenizer, against log-softmax sums of the SPEC §3 PyTorch forward on the exported files."""
    import torch

    tokenizer = open_tokenizer("gpt2")
    model_config, model = btlm_model(vocab_size=50257)
    export_params(tmp_path / "hf", model_config, nnx.state(model, nnx.Param), target="torch", tokenizer=tokenizer)
    lm = ev.ElmjaxLM(model=model, tokenizer=tokenizer, max_length=MAX_LEN, batch_size=4)
    pairs = [("And God said,", " Let there be light"), ("To be, or not to be, ", "that is the question"),
             ("", "In the beginning")]
    ours = lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=p, idx=0) for p in pairs])
    for (context, continuation), (log_prob, greedy) in zip(pairs, ours):
        stripped = context.rstrip()  # lm-eval moves trailing spaces to the continuation
        continuation = context[len(stripped):] + continuation
        whole = [tokenizer.bos_id] + tokenizer.encode(stripped + continuation)
        scored = len(whole) - 1 - len(tokenizer.encode(stripped))
        logits = torch.tensor(reference_btlm_logits(tmp_path / "hf", [whole])[0])
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(whole[1:])
        expected = log_probs[torch.arange(len(targets)), targets][-scored:].sum().item()
        assert log_prob == pytest.approx(expected, abs=1e-3)
        assert greedy == bool((logits[:-1].argmax(-1)[-scored:] == targets[-scored:]).all())
