"""Where elmjax's train step spends its time on XLA:CPU: the profiler's per-kernel times,
grouped by what the kernels compute.

    PYTHONPATH=. python bench/cpu_step_profile.py --model=270m

Runs the step bench/train_step.py times (float32, no remat, one device, the same shapes and
batch), with `train.reuse_host_memory` applied as `python -m elmjax.train` does; it
traces one step after two warm ones with `jax.profiler`, and names each kernel from the
compiled HLO (dumped to a temporary folder): its shape and the jax operation it came from.
The optimizer update runs inside the finite-step conditional, whose kernels run concurrently
on the host's threads, so it is reported by the conditional's wall time, not by the sum of
its kernels. Prints milliseconds and shares of the traced step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="270m", help="tiny or 270m (bench/train_step.py's models)")
    parser.add_argument("--batch", type=int, default=0, help="rows; default the train-step benchmark's")
    parser.add_argument("--seq", type=int, default=0, help="tokens per row; default the benchmark's")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="cpu_step_profile_")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={workdir}/hlo --xla_dump_hlo_module_re=.*jit_run.*")

    from bench.train_step import load_config, random_batch  # the train-step benchmark's own setup
    from elmjax.config import validate
    from elmjax.training import host_memory

    config = load_config(args.model)
    if args.batch:
        config.train.batch_size = args.batch
    if args.seq:
        config.train.seq_len = args.seq
    validate(config)
    host_memory.apply(config.train.reuse_host_memory)  # before the backend starts, as train.py does

    import jax

    from elmjax.training import setup as setup_mod
    from elmjax.training import step as ts

    setup = setup_mod.build_setup(config, jax.devices()[:1])
    state = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer),
                    out_shardings=setup.state_shardings)(setup_mod.fresh_params(setup))
    step, _ = setup_mod.compile_train_step(setup)
    batch = setup_mod.global_batch(setup, random_batch(config))
    for _ in range(2):
        state, metrics = step(state, setup.abstract_frozen, batch)
        jax.block_until_ready(metrics)
    jax.profiler.start_trace(f"{workdir}/trace", create_perfetto_trace=True)
    start = time.perf_counter()
    state, metrics = step(state, setup.abstract_frozen, batch)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    try:
        report(workdir, wall, config.train.seq_len)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kernel_info(workdir) -> dict:
    """{kernel name: (shape, jax op_name)} from the compiled step's HLO."""
    path = glob.glob(f"{workdir}/hlo/*jit_run*cpu_after_optimizations.txt")[0]
    info = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\((.*)$", open(path).read(), re.M):
        op = re.search(r'op_name="([^"]*)"', match.group(3))
        info[match.group(1)] = (match.group(2).split("{")[0], op.group(1) if op else "")
    return info


def _category(name: str, shape: str, op: str, seq: int) -> str | None:
    if op and "/cond/" in op:
        return None  # inside the optimizer's conditional: counted by its wall time
    if name.startswith("cond"):
        return "optimizer update (the finite-step conditional, wall time)"
    if "dot" in name or name.startswith(("ynn_", "xnn_")):
        return "matrix products (dot kernels)"
    if shape.endswith(f",{seq}]"):  # [..., queries, keys]: the scores and their gradients
        return "attention scores: mask, softmax and their layout copies"
    if "transpose(" in op:
        return "other backward elementwise work and copies"
    return "other forward elementwise work and copies"


def report(workdir, wall: float, seq: int):
    trace = json.load(gzip.open(glob.glob(f"{workdir}/trace/**/*perfetto_trace.json.gz", recursive=True)[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    info = _kernel_info(workdir)
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in info and not name.startswith("cond"):
            continue  # runtime and Python spans, not kernels
        shape, op = info.get(name, ("", ""))
        category = _category(name, shape, op, seq)
        if category is not None:
            totals[category] += event.get("dur", 0) / 1e3
    traced = sum(totals.values())
    print(f"one traced step: {wall * 1e3:.0f} ms wall, {traced:.0f} ms in the kernels below")
    for category, ms in totals.most_common():
        print(f"{ms:9.1f} ms {100 * ms / traced:5.1f}%  {category}")


if __name__ == "__main__":
    main()
