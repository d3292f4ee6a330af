"""The flash-attention kernel against the reference, forward and backward, on this machine's
default backend: compiled (Triton on a GPU, Mosaic on a TPU), or in interpret mode on a CPU.

tests/test_flash_attention.py checks the kernel in interpret mode only; this script is the
check that needs an accelerator (bench/accelerator.sh runs it). For each case it compares the
kernel's output and its gradients in q, k, v (of `sum(out * w)`, a random cotangent w) with
the float32 reference (`elmjax.kernels.reference.attention`, matmuls at highest precision) on
the same inputs, and reports the largest error over max(1, max|reference|).

Tolerances: bfloat16 inputs 1.6e-2 (four bf16 ulps of the largest value, as the interpret
tests use). float32 inputs: 5e-5 in interpret mode; 5e-3 compiled, because a Triton dot of
float32 operands runs in TF32 on NVIDIA GPUs (10-bit mantissa) unless told otherwise, which
the kernel does not do.

  PYTHONPATH=. python bench/kernel_check.py --json $OUT/kernel_check.json
  PYTHONPATH=. python bench/kernel_check.py --dry     # CPU: tiny sizes, interpret mode
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.kernels.flash_attention import flash_attention
from elmjax.kernels.reference import attention

# (batch, seq, q heads, kv heads, head_dim, dtype, segments, alibi): head_dim 64/80/128 (80 is
# padded to 128 inside the Triton kernel), GQA 1 and 4, packed documents, ALiBi, a length
# that is not a multiple of the block size.
ACCELERATOR_CASES = [
    (2, 2048, 16, 4, 128, "bfloat16", 1, False),
    (2, 2048, 16, 16, 64, "bfloat16", 1, False),
    (1, 4096, 8, 2, 128, "bfloat16", 3, False),
    (2, 1000, 8, 8, 80, "bfloat16", 1, True),
    (1, 2048, 16, 4, 64, "bfloat16", 4, True),
    (2, 1024, 8, 2, 128, "float32", 1, False),
    (1, 1536, 4, 4, 64, "float32", 2, True),
]
DRY_CASES = [
    (1, 64, 4, 1, 32, "float32", 1, False),
    (1, 40, 2, 2, 32, "bfloat16", 2, True),
]


def alibi_slopes(heads: int):
    """The ALiBi paper's geometric slopes 2^(-8 i / heads)."""
    return jnp.asarray([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], jnp.float32)


def make_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype, segments):
    """q, k, v in `dtype`, a float32 cotangent, and packed-document ids (or None)."""
    rng = np.random.default_rng(seed)
    cast = lambda shape: jnp.asarray(rng.normal(size=shape), dtype)
    q = cast((batch, seq, heads, head_dim))
    k, v = cast((batch, seq, kv_heads, head_dim)), cast((batch, seq, kv_heads, head_dim))
    w = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), jnp.float32)
    segment_ids = None
    if segments > 1:  # sorted document ids 1..segments at random cut points
        cuts = np.sort(rng.integers(1, seq, size=(batch, segments - 1)), axis=1)
        segment_ids = jnp.asarray(1 + (np.arange(seq)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
    return q, k, v, w, segment_ids


def outputs_and_grads(attend, q, k, v, w):
    """attend(q, k, v) and the gradients of sum(attend * w) in q, k, v, as float32."""
    def loss(q, k, v):
        out = attend(q, k, v).astype(jnp.float32)
        return jnp.sum(out * w), out

    @jax.jit
    def run(q, k, v):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [x.astype(jnp.float32) for x in (out, *grads)]

    return jax.block_until_ready(run(q, k, v))


def check(case, seed: int, interpret: bool) -> dict:
    batch, seq, heads, kv_heads, head_dim, dtype, segments, alibi = case
    q, k, v, w, segment_ids = make_inputs(seed, batch, seq, heads, kv_heads, head_dim, jnp.dtype(dtype), segments)
    options = dict(segment_ids=segment_ids, causal=True, alibi_slopes=alibi_slopes(heads) if alibi else None)
    start = time.perf_counter()
    kernel = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, **options), q, k, v, w)
    seconds = time.perf_counter() - start
    # The oracle: float32 on the same (possibly bf16-rounded) inputs, exact matmuls.
    with jax.default_matmul_precision("highest"):
        f32 = lambda x: x.astype(jnp.float32)
        reference = outputs_and_grads(lambda q, k, v: attention(q, k, v, **options), f32(q), f32(k), f32(v), w)
    errors = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel, reference):
        errors[name] = float(jnp.max(jnp.abs(got - want)) / max(1.0, float(jnp.max(jnp.abs(want)))))
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in kernel)
    if dtype == "bfloat16":
        tolerance = 1.6e-2
    else:
        tolerance = 5e-5 if interpret else 5e-3
    return {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "dtype": dtype, "segments": segments, "alibi": alibi, **errors, "tolerance": tolerance,
            "first_call_s": seconds, "ok": finite and max(errors.values()) <= tolerance}


def markdown(rows) -> str:
    lines = ["| batch | seq | q/kv heads | head_dim | dtype | segments | ALiBi | out err | dq err | dk err | "
             "dv err | tolerance | compile+run s | result |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['seq']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | {r['dtype']} "
                         f"| {r['segments']} | {r['alibi']} | {r['error']} ||||||FAIL |")
            continue
        lines.append(f"| {r['batch']} | {r['seq']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | {r['dtype']} | "
                     f"{r['segments']} | {r['alibi']} | {r['out']:.2e} | {r['dq']:.2e} | {r['dk']:.2e} | "
                     f"{r['dv']:.2e} | {r['tolerance']:.0e} | {r['first_call_s']:.1f} | {'ok' if r['ok'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny cases (CPU, interpret mode)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    interpret = jax.default_backend() == "cpu"
    mode = "interpret mode (CPU emulation: says nothing about compiled kernels)" if interpret else "compiled"
    print(f"flash attention vs reference on {jax.devices()[0].device_kind} ({jax.default_backend()}, {mode}), "
          f"jax {jax.__version__}", flush=True)
    rows = []
    for seed, case in enumerate(DRY_CASES if args.dry else ACCELERATOR_CASES):
        try:
            rows.append(check(case, seed, interpret))
        except Exception as error:  # a failed compile is a result: keep checking the rest
            names = ("batch", "seq", "heads", "kv_heads", "head_dim", "dtype", "segments", "alibi")
            rows.append({**dict(zip(names, case)), "ok": False,
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
        print("case", markdown(rows[-1:]).splitlines()[-1], flush=True)  # progress; the table follows
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "interpret": interpret, "rows": rows}, f, indent=1)
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
