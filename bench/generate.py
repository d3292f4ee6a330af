"""Decoding throughput: KV-cache decoding vs recomputing the full forward for every token.

    PYTHONPATH=. python bench/generate.py [--configs tiny,270m] [--batch_sizes 1,8]

Both decoders are greedy, jit-compiled once (a warm-up call is not timed) and produce the same
tokens (checked). The recompute baseline keeps one fixed-shape buffer [batch, prompt + new]
and runs the whole forward over it at every step, reading the logits at the current slot (a
growing shape would recompile per token). Tokens/s counts the new tokens of all rows, prefill
included, over the median of `--repeats` timed calls.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.inference import generate as gen
from elmjax.config import load_config_file, validate
from elmjax.layers.decoder import build_model, count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Prompt and new tokens per config: the 270M recompute baseline is slow on a 2-core CPU.
DEFAULT_LENGTHS = {"tiny": (16, 112), "270m": (16, 16)}


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def recompute_decode(graphdef, state, tokens, segment_ids, positions, *, max_new_tokens: int):
    """Greedy decoding without a cache: new tokens [batch, max_new_tokens]."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    # [batch, prompt_len + max_new_tokens]: the prompt, then the slots of the new tokens.
    buffer = jnp.concatenate([tokens, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    segments = jnp.concatenate([segment_ids, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    new_positions = positions[:, -1:] + 1 + jnp.arange(max_new_tokens)[None]
    all_positions = jnp.concatenate([positions, new_positions], axis=1)

    def one_token(step, buffer):
        logits = model(buffer, segment_ids=segments, positions=all_positions)
        current = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + step, axis=1, keepdims=False)
        token = jnp.argmax(current, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buffer, token[:, None], (0, prompt_len + step))

    buffer = jax.lax.fori_loop(0, max_new_tokens, one_token, buffer)
    return buffer[:, prompt_len:]


def _timed(fn, repeats: int) -> float:
    fn()  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, model):
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(4, 1000, prompt_len - 1).tolist() for _ in range(batch)]
    cached_tokens = []

    def cached():
        cached_tokens[:] = gen.generate(model, prompts, max_new_tokens=new_tokens)

    tokens, segment_ids, positions = gen.left_pad(prompts, 0, prompt_len)
    graphdef, state = nnx.split(model)
    recomputed = []

    def recompute():
        out = recompute_decode(graphdef, state, tokens, segment_ids, positions, max_new_tokens=new_tokens)
        recomputed[:] = np.asarray(out).tolist()

    cached_s = _timed(cached, repeats)
    recompute_s = _timed(recompute, repeats)
    same = cached_tokens == recomputed
    produced = batch * new_tokens
    return {
        "config": name, "batch": batch, "prompt": prompt_len, "new": new_tokens,
        "cache_tok_s": produced / cached_s, "recompute_tok_s": produced / recompute_s,
        "speedup": recompute_s / cached_s, "same_tokens": same,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,270m")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for name in args.configs.split(","):
        config = validate(load_config_file(ROOT / "configs" / f"{name}.py"))
        model = build_model(config.model, seed=0)
        print(f"{name}: {count_params(model):,} parameters", flush=True)
        prompt_len, new_tokens = DEFAULT_LENGTHS.get(name, (16, 32))
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = bench_one(name, batch, prompt_len, new_tokens, args.repeats, model)
            rows.append(row)
            print(row, flush=True)
    print("\n| config | batch | prompt + new tokens | KV cache tok/s | full recompute tok/s | speedup | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['prompt']} + {r['new']} | {r['cache_tok_s']:.1f} | "
              f"{r['recompute_tok_s']:.1f} | {r['speedup']:.1f}x | {r['same_tokens']} |")


if __name__ == "__main__":
    main()
