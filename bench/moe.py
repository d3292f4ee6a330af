"""One MoE layer, forward + backward: the grouped (dropless, sorted) implementation against a
dense SwiGLU with the same active FLOPs (the limit: ratio 1.0) and a naive masked one that
runs every expert on every token.

    PYTHONPATH=. python bench/moe.py [--tokens 1024,4096,16384] [--model_dim 512 --ffn_dim 256
        --experts 64 --top_k 8] [--impls grouped_tiled,grouped_ragged_dot,dense,masked] [--repeats 5]

Every implementation computes the router (float32 logits, softmax, top-k) except `dense`, and
is timed as `jax.grad` of a scalar of its output with respect to the input and all weights,
jit-compiled once (not timed). The timed calls of all implementations are interleaved
(one round = one call of each), so all see the same drifting machine load; each time is the
median over the rounds, and each ratio is against `dense` of the same round set.

- grouped_tiled / grouped_ragged_dot: elmjax's layer (elmjax/layers/moe/): sort the T * k
  assignments by expert, two grouped matmuls (`model.moe_matmul=tiled|ragged_dot`), unsort,
  combine. On CPU, `ragged_dot` is jax's masked dense fallback (every row times every group).
- dense: `down(silu(gate(x)) * up(x))` with inner width k * I: a token's active FLOPs.
- masked: every expert on every token ([T, E, I] hidden), combined with the [T, E] routing
  weights (zero for unchosen experts): E / k times the active FLOPs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.layers.moe import dispatch, router

IMPLS = ("grouped_tiled", "grouped_ragged_dot", "dense", "masked")


def make_params(rng, d: int, inner: int, experts: int, top_k: int) -> dict:
    normal = lambda *shape: jnp.asarray(rng.normal(0.0, 0.02, shape), jnp.float32)  # noqa: E731
    return {
        "router": normal(d, experts),
        "gate_up": normal(experts, d, 2, inner),
        "down": normal(experts, inner, d),
        "dense_gate_up": normal(d, 2 * top_k * inner),  # the active width k * I as one SwiGLU
        "dense_down": normal(top_k * inner, d),
    }


def route(x, params, top_k):
    logits = jnp.dot(x, params["router"], precision=jax.lax.Precision.HIGHEST)
    return router.route(logits, top_k)  # probs [T, E], weights [T, k], experts [T, k]


def layer(impl: str, top_k: int, tile: int):
    """fn(x [T, d], params) -> [T, d] for one implementation."""

    def grouped(matmul):
        def fn(x, params):
            _, weights, experts = route(x, params, top_k)
            out = dispatch.moe(x[None], weights[None], experts[None], params["gate_up"], params["down"],
                               impl=matmul, tile=tile, dispatch="dense", compute_dtype=jnp.float32)
            return out[0]

        return fn

    def dense(x, params):
        gate, up = jnp.split(x @ params["dense_gate_up"], 2, axis=-1)
        return (jax.nn.silu(gate) * up) @ params["dense_down"]

    def masked(x, params):
        probs, weights, experts = route(x, params, top_k)
        # [T, E] combine weights: the chosen probabilities, 0 elsewhere.
        combine = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
        gate = jnp.einsum("td,edi->tei", x, params["gate_up"][:, :, 0])
        up = jnp.einsum("td,edi->tei", x, params["gate_up"][:, :, 1])
        every = jnp.einsum("tei,eid->ted", jax.nn.silu(gate) * up, params["down"])  # [T, E, d]
        return jnp.einsum("ted,te->td", every, combine)

    return {"grouped_tiled": grouped("tiled"), "grouped_ragged_dot": grouped("ragged_dot"),
            "dense": dense, "masked": masked}[impl]


def fwd_bwd(fn):
    """jit of the gradient of sum(out^2) w.r.t. the input and every weight."""
    return jax.jit(jax.grad(lambda x, params: jnp.sum(jnp.square(fn(x, params))), argnums=(0, 1)))


def active_flops(tokens: int, d: int, inner: int, top_k: int) -> float:
    """Forward + backward FLOPs of the k experts a token uses (3 matmuls, x3 for backward)."""
    return 3 * 2 * tokens * top_k * 3 * d * inner


def run(args) -> list[dict]:
    rng = np.random.default_rng(0)
    params = make_params(rng, args.model_dim, args.ffn_dim, args.experts, args.top_k)
    rng = np.random.default_rng(args.tokens[0])
    rows = []
    for tokens in args.tokens:
        x = jnp.asarray(rng.normal(size=(tokens, args.model_dim)), jnp.float32)
        steps = {impl: fwd_bwd(layer(impl, args.top_k, args.tile)) for impl in args.impls}
        for step in steps.values():  # compile and warm up
            jax.block_until_ready(step(x, params))
        times = {impl: [] for impl in args.impls}
        for _ in range(args.repeats):
            for impl, step in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(x, params))
                times[impl].append(time.perf_counter() - start)
        medians = {impl: statistics.median(t) for impl, t in times.items()}
        flops = active_flops(tokens, args.model_dim, args.ffn_dim, args.top_k)
        for impl in args.impls:
            rows.append({
                "tokens": tokens, "impl": impl, "ms": 1e3 * medians[impl],
                "vs_dense": medians[impl] / medians["dense"] if "dense" in medians else None,
                "active_gflops_per_s": flops / medians[impl] / 1e9,
            })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1024,4096,16384", help="comma-separated token counts T")
    parser.add_argument("--model_dim", type=int, default=512)
    parser.add_argument("--ffn_dim", type=int, default=256, help="inner width I of one expert")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--tile", type=int, default=128, help="row tile of the tiled grouped matmul")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.impls = args.impls.split(",")
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; known: {', '.join(IMPLS)}")
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); d {args.model_dim}, "
          f"{args.experts} experts of I {args.ffn_dim}, top-{args.top_k}; float32; fwd+bwd, "
          f"median of {args.repeats} interleaved rounds")
    print("| tokens | impl | fwd+bwd ms | vs dense (same active FLOPs) | active GFLOP/s |")
    print("|---|---|---|---|---|")
    rows = []
    for tokens in args.tokens:  # one token count at a time, printed as it completes
        args_t = argparse.Namespace(**{**vars(args), "tokens": [tokens]})
        for row in run(args_t):
            rows.append(row)
            ratio = "-" if row["vs_dense"] is None else f"{row['vs_dense']:.2f}x"
            print(f"| {row['tokens']} | {row['impl']} | {row['ms']:.1f} | {ratio} | "
                  f"{row['active_gflops_per_s']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
