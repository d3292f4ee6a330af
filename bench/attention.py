"""Attention benchmark: forward and forward+backward time and TFLOP/s, pallas vs xla vs cudnn.

Each implementation is the model's own dispatch (`elmjax.layers.attention.dot_product_attention`
with impl=...), measured side by side in one run; the table reports each time and its ratio
to xla. FLOPs follow the FlashAttention convention: forward = 4 * batch * heads * seq^2 *
head_dim (QK^T and PV), halved when causal; forward+backward = 3.5 x forward.

  PYTHONPATH=. python bench/attention.py                 # GPU/TPU: seq 512..8192
  PYTHONPATH=. python bench/attention.py --seqs 128,256  # CPU: interpret mode, small sizes

On CPU the Pallas kernel runs in interpret mode, so its times say nothing about the kernel's
speed on an accelerator; the script prints that warning with the table.

Without a TPU, `--tpu-topology v5p:2x2x1` compiles forward+backward for that TPU with
libtpu's compiler (needs jax[tpu]; nothing runs) and prints, per kernel, the compile time,
XLA's cost analysis (flops, bytes, `optimal_seconds`) and temp memory, for elmjax's kernel
and, where they cover the case (no GQA, segment ids or ALiBi), jax's own TPU kernels
(splash_attention, ops/tpu/flash_attention). `optimal_seconds` is the compiler's ESTIMATE,
and it sees inside a Pallas call only through the call's declared pl.CostEstimate: elmjax's
kernels declare forward and backward, jax's flash_attention only its forward, splash none.

  PYTHONPATH=. python bench/attention.py --tpu-topology v5p:2x2x1 --batch 4 --seqs 8192 \
      --heads 32 --kv-heads 32 --head-dim 128
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
            print("row", json.dumps(row), flush=True)  # kept in the log if a time limit stops the run
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


def tpu_compile_estimates(args) -> list[dict]:
    """Compile forward+backward (jax.vjp with a cotangent) for `args.tpu_topology` on one of
    its devices, per kernel and seq; rows of compile seconds and the compiled cost analysis."""
    import os

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from elmjax.kernels.flash_attention import flash_attention

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices
    replicated = NamedSharding(Mesh(devices[:1], ("x",)), PartitionSpec())
    dtype = jnp.dtype(args.dtype)
    scale = args.head_dim**-0.5
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        bshd = (args.batch, seq, args.heads, args.head_dim)
        kv_bshd = (args.batch, seq, args.kv_heads, args.head_dim)
        impls = {"elmjax": (lambda q, k, v: flash_attention(
            q, k, v, causal=args.causal, backend="mosaic_tpu"), bshd, kv_bshd)}
        if args.heads == args.kv_heads:  # jax's kernels: [batch, heads, seq, head_dim], MHA
            from jax.experimental.pallas.ops.tpu import flash_attention as jax_flash
            from jax.experimental.pallas.ops.tpu.splash_attention import (
                splash_attention_kernel as splash,
                splash_attention_mask as splash_mask,
            )

            bhsd = (args.batch, args.heads, seq, args.head_dim)
            impls["jax_flash_128"] = (lambda q, k, v: jax_flash.flash_attention(
                q, k, v, causal=args.causal, sm_scale=scale), bhsd, bhsd)
            mask_cls = splash_mask.CausalMask if args.causal else splash_mask.FullMask
            mask = splash_mask.MultiHeadMask([mask_cls((seq, seq)) for _ in range(args.heads)])
            for block in (128, 512):
                if seq % block:
                    continue
                kernel = splash.make_splash_mha(
                    mask, head_shards=1, q_seq_shards=1,
                    block_sizes=splash.BlockSizes(*(min(block, seq),) * 3, *(min(block, seq),) * 5),
                )
                impls[f"splash_{block}"] = (
                    lambda q, k, v, kernel=kernel: jax.vmap(kernel)(q * scale, k, v), bhsd, bhsd
                )
        for name, (attend, q_shape, kv_shape) in impls.items():
            q = jax.ShapeDtypeStruct(q_shape, dtype, sharding=replicated)
            kv = jax.ShapeDtypeStruct(kv_shape, dtype, sharding=replicated)

            def fwd_bwd(q, k, v, dout, attend=attend):
                out, vjp = jax.vjp(attend, q, k, v)
                return (out, *vjp(dout))

            row = {"seq": seq, "impl": name}
            start = time.perf_counter()
            try:
                compiled = jax.jit(fwd_bwd).lower(q, kv, kv, q).compile()
                analysis = compiled.cost_analysis()
                analysis = analysis[0] if isinstance(analysis, list) else analysis
                row.update(
                    compile_s=time.perf_counter() - start,
                    flops=analysis.get("flops", 0.0),
                    bytes=analysis.get("bytes accessed", 0.0),
                    optimal_seconds=analysis.get("optimal_seconds", float("nan")),
                    temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
                )
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            rows.append(row)
            print("row", json.dumps(row), flush=True)  # kept in the log if a time limit stops the run
    return rows


def estimates_markdown(rows: list[dict], args) -> str:
    flops = lambda seq: attention_flops(args.batch, seq, args.heads, args.head_dim, args.causal, True)
    lines = [
        "| seq | impl | compile s | XLA flops | vs 3.5x-fwd convention | XLA bytes | optimal_seconds (estimate) | temp MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['impl']} | {r['error']} ||||||")
            continue
        lines.append(
            f"| {r['seq']} | {r['impl']} | {r['compile_s']:.1f} | {r['flops']:.3g} "
            f"| {r['flops'] / flops(r['seq']):.2f} | {r['bytes']:.3g} | {r['optimal_seconds']:.3g} "
            f"| {r['temp_mib']:.0f} |"
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
    parser.add_argument(
        "--tpu-topology",
        help="instead of timing, compile for this TPU topology (e.g. v5p:2x2x1, v5e:2x2) with "
        "libtpu's compiler and print the compiler's cost and time estimates",
    )
    args = parser.parse_args()

    if args.tpu_topology:
        print(
            f"TPU compile-only ({args.tpu_topology}), jax {jax.__version__}: batch {args.batch}, "
            f"q heads {args.heads}, kv heads {args.kv_heads}, head_dim {args.head_dim}, "
            f"{args.dtype}, causal={args.causal}, forward+backward. optimal_seconds is the "
            "compiler's estimate, blind to a Pallas kernel's insides beyond its declared cost."
        )
        rows = tpu_compile_estimates(args)
        print(estimates_markdown(rows, args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"topology": args.tpu_topology, "args": vars(args), "rows": rows}, f, indent=2)
        return

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
