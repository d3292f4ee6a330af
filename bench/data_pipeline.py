"""Data loader throughput vs. the tiny model's CPU train step, side by side in one run.

  PYTHONPATH=. python bench/data_pipeline.py [--workers=0,1,2] [--batches=150] [--steps=8]

Measures, on this machine:
  1. loader tokens/s for configs/tiny.py (batch 16 x 128) from a token store (written
     first by tools/prepare_data.py's `prepare`) and with on-the-fly SentencePiece
     tokenisation of the embedded corpus, for each worker count;
  2. the tiny model's train step (forward + backward + optax.adamw, jit, CPU) tokens/s;
  3. the ratio loader / train step (the issue asks for >= 20x);
  4. the 3B model's need on an 8 x H100 host at 50% MFU vs. one host core's loader rate at
     seq 2048 with a 32000-piece tokenizer (FLOPs/token per SPEC §4).
Prints a Markdown table (for bench/README.md) and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s per GPU
GPUS_PER_HOST = 8
TARGET_MFU = 0.5


def load_config(path: str):
    from elmjax.config import load_config_file

    return load_config_file(path)


def loader_tokens_per_second(config, batches: int, warmup: int = 5) -> float:
    """Tokens/s of make_train_iterator after `warmup` batches (worker start-up excluded)."""
    from elmjax.data.pipeline import make_train_iterator

    iterator = make_train_iterator(config, process_index=0, process_count=1)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return batches * batch["inputs"].size / elapsed


def train_step_tokens_per_second(config, steps: int) -> float:
    """A plain forward + backward + AdamW step of the config's model, jit-compiled on CPU."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from elmjax.data.pipeline import make_train_iterator
    from elmjax.layers.decoder import build_model

    model = build_model(config.model, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(
            batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    iterator = make_train_iterator(config, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(steps + 2)]
    for batch in batches[:2]:  # compile + one warm step
        params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for batch in batches[2:]:
        params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    elapsed = time.perf_counter() - start
    assert np.isfinite(float(loss))
    return steps * batches[0]["inputs"].size / elapsed


def flops_per_token(model_config, seq_len: int) -> tuple[float, int]:
    """(SPEC §4 training FLOPs per token without the output head, non-embedding parameters):
    the counter MFU uses (elmjax.training.metrics)."""
    from elmjax.layers.decoder import abstract_model, count_params
    from elmjax.training.metrics import flops_per_token as spec_flops_per_token

    n_nonembedding = count_params(abstract_model(model_config)) - model_config.vocab_size * model_config.model_dim
    return spec_flops_per_token(model_config, seq_len, include_output_head=False), n_nonembedding


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=150, help="timed loader batches per row")
    parser.add_argument("--steps", type=int, default=8, help="timed train steps")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("ELMJAX_CACHE", os.path.join(tempfile.gettempdir(), "elmjax_bench_cache"))

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools.prepare_data import prepare

    config = load_config(args.config)
    workdir = tempfile.mkdtemp(prefix="elmjax_bench_")
    store = os.path.join(workdir, "tiny_store")
    prepare(config, store)

    rows = []
    for mode in ("token store", "on-the-fly"):
        for workers in (int(w) for w in args.workers.split(",")):
            run = load_config(args.config)
            run.data.num_workers = workers
            if mode == "token store":
                run.data.source = store
            rate = loader_tokens_per_second(run, args.batches)
            rows.append({"source": mode, "workers": workers, "tokens_per_s": rate})
            print(f"loader {mode:11s} workers={workers}: {rate:,.0f} tokens/s", flush=True)
    train_rate = train_step_tokens_per_second(config, args.steps)
    print(f"tiny train step (CPU): {train_rate:,.0f} tokens/s", flush=True)

    # The 3B model's need on one 8-GPU host, and one core's loader rate at its shape.
    big = load_config("configs/3b.py")
    fpt, n_nonembedding = flops_per_token(big.model, big.train.seq_len)
    needed = GPUS_PER_HOST * H100_BF16_DENSE_PEAK * TARGET_MFU / fpt
    core = load_config(args.config)
    core.train.seq_len, core.model.max_seq_len, core.train.batch_size = 2048, 2048, 8
    core.model.vocab_size = 32000
    one_core = {}
    for mode in ("token store", "on-the-fly"):
        run = load_config(args.config)
        run.train.seq_len, run.model.max_seq_len, run.train.batch_size = 2048, 2048, 8
        run.model.vocab_size = 32000  # a 32000-piece BPE, like the LLaMA tokenizer
        if mode == "token store":
            run.data.source = os.path.join(workdir, "store_32k")
            if not os.path.exists(run.data.source):
                prepare(core, run.data.source)
        one_core[mode] = loader_tokens_per_second(run, max(args.batches // 5, 10))
        print(f"one core, seq 2048, 32k vocab, {mode}: {one_core[mode]:,.0f} tokens/s", flush=True)

    print("\n| loader source | workers | loader tokens/s | tiny train step tokens/s | loader / step |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = row["tokens_per_s"] / train_rate
        row["ratio"] = ratio
        print(f"| {row['source']} | {row['workers']} | {row['tokens_per_s']:,.0f} | {train_rate:,.0f} | {ratio:.0f}x |")
    print(
        f"\n3B (N_nonembedding {n_nonembedding:,}, seq 2048): {fpt / 1e9:.2f} GFLOP/token; "
        f"8 x H100 at 50% MFU consume {needed:,.0f} tokens/s per host."
    )
    for mode, rate in one_core.items():
        print(f"one host core ({mode}, seq 2048, 32k vocab): {rate:,.0f} tokens/s = {rate / needed:.1f}x the need")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"loader": rows, "train_step_tokens_per_s": train_rate, "flops_per_token_3b": fpt,
                       "needed_tokens_per_s_3b_host": needed, "one_core": one_core}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
