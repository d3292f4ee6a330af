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
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="270m", help="tiny or 270m (bench/train_step.py's models)")
    parser.add_argument("--batch", type=int, default=0, help="rows; default the train-step benchmark's")
    parser.add_argument("--seq", type=int, default=0, help="tokens per row; default the benchmark's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpu_step_profile_") as workdir:
        wall, seq = profile_step(args, workdir)
        report(workdir, wall, seq)


def profile_step(args, workdir) -> tuple[float, int]:
    """(wall seconds of one traced step, its sequence length); the HLO dump and the trace
    land in `workdir`."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={workdir}/hlo --xla_dump_hlo_module_re=.*jit_run.*")

    from bench.train_step import elmjax_step, load_config  # the train-step benchmark's own step
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

    _, state, step, _, batch, frozen = elmjax_step(config)
    for _ in range(2):
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
    jax.profiler.start_trace(f"{workdir}/trace", create_perfetto_trace=True)
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    return wall, config.train.seq_len


def _only(pattern: str) -> str:
    paths = glob.glob(pattern, recursive=True)
    if not paths:
        raise SystemExit(f"error: nothing matches {pattern}: the step's HLO dump or trace was not written")
    return paths[-1]


# An HLO instruction: name = shape (one array, or a tuple in parentheses) opcode(operands ...
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\((.*)$", re.M)
# A computation: its name, then its body up to the closing brace at the start of a line.
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{$(.*?)^\}$", re.M | re.S)
# Kernel spans in the trace carry an HLO instruction's name; runtime and Python spans do not
# ("ThunkExecutor::Execute", "Wait for donation holds", "$api.py:...", "PjitFunction(...)").
_KERNEL_NAME = re.compile(r"^[a-z][\w.\-]*$")  # HLO names: lower-case, no spaces


def _kernels(workdir) -> dict:
    """{kernel name: (is a matrix product, shape, jax op_name)} from the compiled step's HLO:
    a matrix product is a dot, or a fusion whose computation holds one."""
    with open(_only(f"{workdir}/hlo/*jit_run*cpu_after_optimizations.txt")) as file:
        hlo = file.read()
    with_dots = {name for name, body in _COMPUTATION.findall(hlo) if " dot(" in body or " convolution(" in body}
    kernels = {}
    for name, shape, opcode, rest in _INSTRUCTION.findall(hlo):
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        matmul = opcode in ("dot", "convolution") or bool(called and called.group(1) in with_dots)
        op = re.search(r'op_name="([^"]*)"', rest)
        kernels[name] = (matmul, shape.split("{")[0], op.group(1) if op else "")
    return kernels


def category(matmul: bool, shape: str, op: str, seq: int, name: str = "") -> str | None:
    """What a kernel computes, from the HLO; None for the optimizer's own kernels, which are
    counted by their conditional's wall time (this test comes before the conditional's own)."""
    if "/cond/" in op:
        return None
    if name.startswith("cond"):
        return "optimizer update (the finite-step conditional, wall time)"
    if matmul:
        return "matrix products (dots and fusions around them)"
    dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[-1])] if "[" in shape else []
    if len(dims) >= 4 and dims[-1] % seq == 0 and dims[-2] % seq == 0:
        return "attention scores: mask, softmax and their layout copies"  # [batch, heads, ..., queries, keys]
    if "transpose(" in op:
        return "other backward elementwise work and copies"
    return "other forward elementwise work and copies"


def report(workdir, wall: float, seq: int):
    with gzip.open(_only(f"{workdir}/trace/**/*perfetto_trace.json.gz")) as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = _kernels(workdir)
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or not _KERNEL_NAME.match(name):
            continue
        found = category(*kernels[name], seq, name) if name in kernels else "kernels the HLO dump does not name"
        if found is not None:
            totals[found] += event.get("dur", 0) / 1e3
    traced = sum(totals.values())
    print(f"one traced step: {wall * 1e3:.0f} ms wall, {traced:.0f} ms in the kernels below")
    for name, ms in totals.most_common():
        print(f"{ms:9.1f} ms {100 * ms / traced:5.1f}%  {name}")


if __name__ == "__main__":
    main()
