"""Attention benchmark: forward and forward+backward time and TFLOP/s, pallas vs xla vs cudnn.

Each implementation is the model's own dispatch (`elmjax.layers.attention.dot_product_attention`
with impl=...), measured side by side in one run; the table reports each time and its ratio
to xla. FLOPs follow the FlashAttention convention: forward = 4 * batch * heads * seq^2 *
head_dim (QK^T and PV), halved when causal; forward+backward = 3.5 x forward.

  PYTHONPATH=. python bench/attention.py                 # GPU/TPU: seq 512..8192
  PYTHONPATH=. python bench/attention.py --seqs 128,256  # CPU: interpret mode, small sizes

On CPU the Pallas kernel runs in interpret mode, so its times say nothing about the kernel's
speed on an accelerator; the script prints that warning with the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.layers.attention import dot_product_attention


def attention_flops(batch, seq, heads, head_dim, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def median_seconds(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_fns(impl: str, causal: bool):
    def forward(q, k, v):
        return dot_product_attention(q, k, v, impl=impl, causal=causal)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v).astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def backward_temp_memory(args, seq: int) -> list[dict]:
    """XLA's temp bytes of the compiled forward+backward per impl at `seq` (compile only)."""
    dtype = jnp.dtype(args.dtype)
    q = jax.ShapeDtypeStruct((args.batch, seq, args.heads, args.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((args.batch, seq, args.kv_heads, args.head_dim), dtype)
    rows = []
    for impl in args.impls.split(","):
        try:
            compiled = make_fns(impl, args.causal)[1].lower(q, kv, kv).compile()
            rows.append({"impl": impl, "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20})
        except Exception as error:
            rows.append({"impl": impl, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"})
    return rows


def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        rng = np.random.default_rng(seq)
        q = jnp.asarray(rng.normal(size=(args.batch, seq, args.heads, args.head_dim)), dtype)
        k = jnp.asarray(rng.normal(size=(args.batch, seq, args.kv_heads, args.head_dim)), dtype)
        v = jnp.asarray(rng.normal(size=(args.batch, seq, args.kv_heads, args.head_dim)), dtype)
        for impl in args.impls.split(","):
            row = {"seq": seq, "impl": impl}
            forward, grad = make_fns(impl, args.causal)
            try:
                for name, fn, backward in (("fwd", forward, False), ("fwd_bwd", grad, True)):
                    seconds = median_seconds(fn, (q, k, v), args.iters)
                    flops = attention_flops(args.batch, seq, args.heads, args.head_dim, args.causal, backward)
                    row[f"{name}_ms"] = seconds * 1e3
                    row[f"{name}_tflops"] = flops / seconds / 1e12
            except Exception as error:  # reported in the table, e.g. cudnn off-GPU or OOM
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| seq | impl | fwd ms | fwd TFLOP/s | fwd vs xla | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs xla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    xla = {r["seq"]: r for r in rows if r["impl"] == "xla" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['impl']} | {r['error']} |||||||")
            continue
        base = xla.get(r["seq"])
        ratio = lambda key: f"{base[key] / r[key]:.2f}x" if base else "n/a"
        lines.append(
            f"| {r['seq']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.3g} | {ratio('fwd_ms')} "
            f"| {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.3g} | {ratio('fwd_bwd_ms')} |"
        )
    return "\n".join(lines)


def main():
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="128,256" if on_cpu else "512,1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=1 if on_cpu else 2)
    parser.add_argument("--heads", type=int, default=4 if on_cpu else 16)
    parser.add_argument("--kv-heads", type=int, default=1 if on_cpu else 4)
    parser.add_argument("--head-dim", type=int, default=64 if on_cpu else 128)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--impls", default="pallas,xla,cudnn")
    parser.add_argument("--iters", type=int, default=2 if on_cpu else 20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--memory-seq", type=int, default=0,
        help="instead of timing, report the compiled forward+backward temp memory at this seq",
    )
    args = parser.parse_args()

    devices = jax.devices()
    print(f"device: {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(
        f"batch {args.batch}, q heads {args.heads}, kv heads {args.kv_heads}, head_dim "
        f"{args.head_dim}, {args.dtype}, causal={args.causal}, median of {args.iters} runs"
    )
    if on_cpu:
        print(
            "WARNING: CPU run. The Pallas kernel runs in interpret mode (an emulation of the "
            "kernel's grid in XLA), so its times are NOT meaningful; run on a GPU/TPU."
        )
    if args.memory_seq:
        seq = args.memory_seq
        matrix_mib = args.batch * args.heads * seq * seq * 4 / 2**20
        print(f"forward+backward temp memory at seq {seq} (one float32 [batch, heads, seq, seq] = {matrix_mib:.0f} MiB)")
        rows = backward_temp_memory(args, seq)
        for r in rows:
            print(f"  {r['impl']}: " + (r["error"] if "error" in r else f"{r['temp_mib']:.1f} MiB"))
    else:
        rows = run(args)
        print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": devices[0].device_kind, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
