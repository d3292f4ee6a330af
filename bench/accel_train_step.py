"""elmjax's train step on one accelerator: tokens/s and MFU, per attention implementation.

The step is the one `python -m elmjax.train` compiles (forward, backward, clipped AdamW,
float32 master parameters, `--dtype` compute), built with elmjax.training.setup on one device
and fed one fixed random batch, so no data pipeline is involved. After a warm-up step it
times `--steps` steps (each synchronised) and reports the median.

MFU = FLOPs per token (elmjax.training.metrics.flops_per_token: SPEC §4 plus the tied output
matmul, the figure the trainer logs) x tokens/s over a peak. Two peaks are reported: the
chip's datasheet dense peak for the compute dtype where the device is known (H100/H200 SXM:
989.4 TFLOP/s bf16), and the best large matmul this script measures in the same process.

  PYTHONPATH=. python bench/accel_train_step.py --config=1_1b --batch=8 --seq=2048 --impls=auto,xla
  PYTHONPATH=. python bench/accel_train_step.py --dry        # CPU: tiny config, tiny batch
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Dense (no sparsity) datasheet peaks in FLOP/s, by a substring of jax's device_kind.
DATASHEET_PEAKS = {"bfloat16": {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12},
                   "float32": {"H200": 66.9e12, "H100": 66.9e12, "A100": 19.5e12}}


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    for name, peak in DATASHEET_PEAKS.get(dtype, {}).items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def measured_matmul_peak(dtype: str, size: int) -> float:
    """Best FLOP/s of a size^3 matmul in `dtype` over a few timed runs (after a warm-up)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_impl(args, impl: str) -> dict:
    """Compile and time the train step with `model.attention_impl = impl`."""
    import jax
    import numpy as np

    from elmjax.config import load_config_file
    from elmjax.training import step as ts
    from elmjax.training.dry_run import memory_report
    from elmjax.training.metrics import flops_per_token
    from elmjax.training.setup import build_setup, compile_train_step, fresh_params, frozen_variables, global_batch

    config = load_config_file(ROOT / "configs" / f"{args.config}.py")
    config.train.batch_size, config.train.seq_len, config.train.grad_accum_steps = args.batch, args.seq, 1
    config.model.max_seq_len = max(config.model.max_seq_len, args.seq)
    config.model.compute_dtype, config.model.param_dtype = args.dtype, "float32"
    config.model.attention_impl = impl
    if args.remat:
        config.model.remat_policy = args.remat
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    setup = build_setup(config, jax.devices()[:1])
    state = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer),
                    out_shardings=setup.state_shardings)(fresh_params(setup))
    compiled, compile_seconds = compile_train_step(setup)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq)
    tokens = rng.integers(0, config.model.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = global_batch(setup, {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, np.float32)})
    frozen = frozen_variables(setup)
    state, metrics = compiled(state, frozen, batch)  # warm-up (first run's allocations)
    first_loss = float(jax.block_until_ready(metrics)["loss"])
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times)
    tokens_per_step = args.batch * args.seq
    return {"impl": impl, "config": args.config, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
            "remat": config.model.remat_policy, "compile_s": compile_seconds, "step_s": step_seconds,
            "tokens_per_s": tokens_per_step / step_seconds,
            "model_flops_per_s": flops_per_token(config.model, args.seq) * tokens_per_step / step_seconds,
            "memory_gib": memory_report(compiled).get("total_bytes", 0) / 2**30,
            "first_loss": first_loss, "last_loss": losses[-1] if losses else first_loss,
            "losses_finite": bool(np.all(np.isfinite(losses + [first_loss])))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="1_1b", help="configs/<name>.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    parser.add_argument("--remat", default="", help="remat policy (default: the config's)")
    parser.add_argument("--impls", default="auto,xla", help="attention_impl values, one compile each")
    parser.add_argument("--matmul", type=int, default=8192, help="size of the measured peak matmul")
    parser.add_argument("--dry", action="store_true", help="CPU check: tiny config, batch 2 x 64, 2 steps")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.dry:
        args.config, args.batch, args.seq, args.steps, args.matmul = "tiny", 2, 64, 2, 256
        args.impls = "xla"  # pallas in interpret mode would only time an emulation
    import jax

    device = jax.devices()[0].device_kind
    print(f"train step on {device} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    measured = measured_matmul_peak(args.dtype, args.matmul)
    sheet = datasheet_peak(device, args.dtype)
    print(f"measured {args.matmul}^3 {args.dtype} matmul peak: {measured / 1e12:.1f} TFLOP/s; datasheet peak: "
          + (f"{sheet / 1e12:.1f} TFLOP/s" if sheet else "unknown for this device"))
    # Header first and each row as soon as it is measured, so a run stopped by its time limit
    # still leaves the rows it finished.
    print("| config | attention_impl | batch x seq | dtype | remat | compile s | step s | tokens/s | "
          "model TFLOP/s | MFU (datasheet) | MFU (measured matmul) | XLA mem GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for impl in args.impls.split(","):
        try:
            r = run_impl(args, impl)
            r["mfu_measured_peak"] = r["model_flops_per_s"] / measured
            r["mfu_datasheet"] = r["model_flops_per_s"] / sheet if sheet else None
            sheet_mfu = "-" if r["mfu_datasheet"] is None else f"{100 * r['mfu_datasheet']:.1f}%"
            print(f"| {r['config']} | {r['impl']} | {r['batch']}x{r['seq']} | {r['dtype']} | {r['remat']} | "
                  f"{r['compile_s']:.1f} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['model_flops_per_s'] / 1e12:.1f} | {sheet_mfu} | {100 * r['mfu_measured_peak']:.1f}% | "
                  f"{r['memory_gib']:.2f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |", flush=True)
        except Exception as error:  # an impl that cannot compile here is a result too
            r = {"impl": impl, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            print(f"| {args.config} | {impl} | {r['error']} |||||||||||", flush=True)
        rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "matmul_peak": measured, "datasheet_peak": sheet, "rows": rows}, f, indent=1)
    return 0 if all("error" not in r and r["losses_finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
