"""KV-cache text generation: greedy or temperature / top-k / top-p sampling, stop on EOS.

`generate(model, prompts, ...)` decodes a batch of token prompts of different lengths: they
are left-padded to a common length (padding is never attended; positions restart at 0 for
each row's first real token), one jit-compiled function runs the prefill and then a
`lax.while_loop` of single-token steps against the per-layer cache (model/kv_cache.py), so
nothing is recompiled per token. Shapes are rounded up to buckets, so calls with similar
lengths reuse one compilation.

    python -m elmjax.generate --checkpoint WORKDIR --prompt "Once upon a time" \
        [--max_new_tokens 64 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0]
    python -m elmjax.generate --checkpoint WORKDIR --chat [--system "Be brief."] --prompt "Hi!"

`--chat` renders each prompt as a user turn (after an optional system turn) with the run's
chat template (`data.chat_template`, OpenELM-Instruct's by default; elmjax/data/chat.py),
ends it with the assistant header, and prints the reply, which stops at EOS. The tokenizer
is the one kept in the checkpoint's workdir (elmjax/data/run_files.py) when there is one.
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.layers.kv_cache import init_cache

# Prompt and total lengths are rounded up to multiples of this (fewer distinct compilations).
LENGTH_BUCKET = 16


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


def sample_logits(logits, rng, temperature, top_k, top_p):
    """Samples one token id per row from `logits` [batch, vocab] (float32).

    `temperature` > 0 divides the logits; `top_k` > 0 keeps the k largest; `top_p` < 1 keeps
    the smallest set of most likely tokens whose probability reaches top_p (after top-k).
    All three may be traced values, so changing them does not recompile.
    """
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    descending = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    descending = jnp.where(jnp.arange(vocab) < k, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) & jnp.isfinite(descending)  # the most likely token always stays
    cutoff = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _pick(logits, rng, temperature, top_k, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, rng, temperature, top_k, top_p)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "greedy")
)
def _decode(graphdef, state, tokens, segment_ids, positions, rng, temperature, top_k, top_p,
            eos_id, *, max_new_tokens: int, max_len: int, greedy: bool):
    """Prefill + decode loop. tokens/segment_ids/positions [batch, prompt_len], left-padded.

    Returns (new tokens [batch, max_new_tokens] int32, -1 after a row's EOS;
    steps run [] int32).
    """
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    cache = init_cache(model.schedule, batch, max_len, model.head_dim, model.compute_dtype)
    logits, cache = model(tokens, segment_ids=segment_ids, positions=positions, cache=cache)
    rng, step_rng = jax.random.split(rng)
    first = _pick(logits[:, -1], step_rng, temperature, top_k, top_p, greedy)
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    done = first == eos_id
    ones = jnp.ones((batch, 1), jnp.int32)

    def keep_going(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(carry):
        step, cache, last, position, out, done, rng = carry
        logits, cache = model(last[:, None], segment_ids=ones, positions=position[:, None], cache=cache)
        rng, step_rng = jax.random.split(rng)
        token = _pick(logits[:, 0], step_rng, temperature, top_k, top_p, greedy)
        token = jnp.where(done, -1, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        next_input = jnp.maximum(token, 0)  # finished rows feed a harmless id
        return step + 1, cache, next_input, position + 1, out, done | (token == eos_id), rng

    carry = (jnp.int32(1), cache, first, positions[:, -1] + 1, out, done, rng)
    steps, _, _, _, out, _, _ = jax.lax.while_loop(keep_going, one_token, carry)
    return out, steps


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts, pad_id: int, length: int):
    """Left-pads token lists to `length`: (tokens, segment_ids, positions), each [batch, length]
    int32; segment id 1 marks real tokens, positions count from each row's first real token."""
    batch = len(prompts)
    tokens = np.full((batch, length), pad_id, np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        tokens[row, start:] = prompt
        segment_ids[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return tokens, segment_ids, positions


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             max_seq_len: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists, BOS included if wanted).

    temperature 0 is greedy. Decoding of a row stops after `eos_id` (not included in the
    result) or after `max_new_tokens`. `max_seq_len` (the model's context) refuses prompts that
    do not fit together with `max_new_tokens`. An empty prompt list returns [].
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; need >= 1")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} has no tokens; give at least one (e.g. BOS)")
        if max_seq_len is not None and len(prompt) + max_new_tokens > max_seq_len:
            raise PromptTooLongError(
                f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                f"that is {len(prompt) + max_new_tokens} > the model's context of {max_seq_len} "
                "tokens; shorten the prompt or lower max_new_tokens"
            )
    longest = max(len(p) for p in prompts)
    prompt_len = _round_up(longest, LENGTH_BUCKET)
    max_len = _round_up(prompt_len + max_new_tokens, LENGTH_BUCKET)
    if max_seq_len is not None:  # bucket padding may fill the context, never go beyond it
        prompt_len = min(prompt_len, max_seq_len - max_new_tokens)
        max_len = min(max_len, max_seq_len)
    tokens, segment_ids, positions = left_pad(prompts, pad_id, prompt_len)
    graphdef, state = nnx.split(model)
    out, _ = _decode(
        graphdef, state, tokens, segment_ids, positions, jax.random.key(seed),
        jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
        jnp.int32(-1 if eos_id is None else eos_id),
        max_new_tokens=max_new_tokens, max_len=max_len, greedy=temperature <= 0,
    )
    results = []
    for row in np.asarray(out).tolist():
        row = [t for t in row if t >= 0]
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results


def generate_text(model, tokenizer, prompts, *, max_new_tokens: int, max_seq_len=None,
                  **sampling) -> list[str]:
    """Decoded continuations of text `prompts` (each encoded with BOS first, if the vocabulary
    has one)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    new = generate(model, [tokenizer.bos_prefix + ids for ids in encoded], max_new_tokens=max_new_tokens,
                   eos_id=tokenizer.eos_id, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, **sampling)
    return [continuation_text(tokenizer, prompt, ids) for prompt, ids in zip(encoded, new)]


def continuation_text(tokenizer, prompt_ids, new_ids) -> str:
    """The text `new_ids` add after `prompt_ids`. Decoding the new ids alone would drop a
    leading space (SentencePiece strips the first piece's "▁"), so decode both and cut."""
    prompt_text = tokenizer.decode(prompt_ids)
    whole = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return whole[len(prompt_text):] if whole.startswith(prompt_text) else tokenizer.decode(new_ids)


def sample_text(model, tokenizer, prompt: str = "The", max_new_tokens: int = 32, *,
                max_seq_len=None, temperature: float = 0.0, seed: int = 0) -> str:
    """One short continuation of `prompt` (greedy by default): the end-of-training sample."""
    return generate_text(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                         max_seq_len=max_seq_len, temperature=temperature, seed=seed)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir or step directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default latest")
    parser.add_argument("--prompt", action="append", default=[],
                        help="a prompt; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true",
                        help="apply the chat template: each prompt is a user turn; print the reply")
    parser.add_argument("--system", default=None, help="with --chat: a system turn before the prompt")
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    # written so that NaN fails too (every comparison with it is false)
    if not (args.top_k >= 0 and 0 < args.top_p <= 1 and 0 <= args.temperature < float("inf")):
        parser.error("need --top_k >= 0, 0 < --top_p <= 1 and a finite --temperature >= 0")
    if not args.prompt:
        parser.error("no --prompt given; pass --prompt TEXT (repeat it for several)")

    from elmjax.training.checkpoint import load_model
    from elmjax.data.tokenizer_choice import load_tokenizer, run_tokenizer

    config, model = load_model(args.checkpoint, step=args.step)
    tokenizer = run_tokenizer(args.checkpoint) or load_tokenizer(config)
    sampling = dict(max_new_tokens=args.max_new_tokens, max_seq_len=config.model.max_seq_len,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        if args.chat:
            texts = chat_replies(model, tokenizer, config.data.get("chat_template", "") or "openelm",
                                 args.prompt, system=args.system, **sampling)
        else:
            texts = generate_text(model, tokenizer, args.prompt, **sampling)
    except PromptTooLongError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts):
        if args.chat and len(args.prompt) > 1:  # a reply alone does not say whose it is
            print(f"> {prompt}")
        print(text if args.chat else f"{prompt}{text}")
    return 0


def chat_replies(model, tokenizer, template: str, prompts, *, system=None, max_new_tokens: int,
                 max_seq_len=None, **sampling) -> list[str]:
    """The assistant's reply to each prompt, rendered as a user turn (after a `system` turn
    when given) with chat template `template` (a data.chat_template value); stops at EOS."""
    from elmjax.data.chat import encode_conversation
    from elmjax.data.formats import chat_header

    header = chat_header(template)
    turns = [[{"role": "system", "content": system}] if system is not None else [] for _ in prompts]
    encoded = [encode_conversation(tokenizer, head + [{"role": "user", "content": prompt}], header,
                                   add_generation_prompt=True)[0].tolist()
               for head, prompt in zip(turns, prompts)]
    new = generate(model, encoded, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                   max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, **sampling)
    return [tokenizer.decode(ids) for ids in new]


if __name__ == "__main__":
    sys.exit(main())
