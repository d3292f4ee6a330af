"""Train-step benchmark: elmjax vs the strongest eager PyTorch OpenELM, side by side in one run.

For each model (tiny, 270m) it starts one elmjax worker and, one after another, a PyTorch
worker per variant, each in its own subprocess (so memory and thread settings do not mix):
  elmjax          elmjax's compiled train step (forward, backward, clipped AdamW; float32; one
                  device), with `train.reuse_host_memory` applied as `python -m elmjax.train` does
  torch           elmjax.models.openelm.torch_model (Hugging Face style eager model, SDPA causal
                  attention with native GQA) + torch.optim.AdamW(fused=True), float32,
                  torch.set_num_threads(cores), OMP_WAIT_POLICY=PASSIVE, the default glibc allocator
  torch_glibc     the same process given glibc's malloc settings through the environment
                  (MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=2^40: one heap,
                  no mmap, never trimmed; what elmjax's reuse_host_memory does with mallopt)
  torch_jemalloc  (--jemalloc=PATH) the same process with jemalloc LD_PRELOADed, decay disabled
Both frameworks start from the same weights (the elmjax worker exports its fresh parameters
as a Hugging Face directory that the PyTorch workers load) and train on the same batch; the
losses of their first (warm-up) step are printed side by side as a check.

Timing: the elmjax worker and one PyTorch worker take turns, one step each per round, the
order flipping every round (A B, B A, A B, ...), so both see the same drifting load of this
shared machine. Each round gives a ratio (PyTorch step time / elmjax step time = elmjax
tokens/s over PyTorch tokens/s); the table reports medians and every round's ratio. The load
average is read at the start and end of each pairing.

  PYTHONPATH=. python bench/train_step.py                           # tiny and 270m, 5 rounds
  PYTHONPATH=. python bench/train_step.py --models=270m --rounds=7 --jemalloc=/path/libjemalloc.so.2

FLOPs convention: SPEC §4 (6 * non-embedding matmul weights + 6 * seq * q_heads * head_dim
per layer) plus 6 * vocab * model_dim for the tied output matmul. MFU is over this CPU's
float32 peak: the best 2048^3 matmul any worker reached in the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": None, "270m": (4, 256)}  # (batch, seq); None = the config's own
TORCH_VARIANTS = ("torch", "torch_glibc", "torch_jemalloc")
LABELS = {"jax": "elmjax", "torch": "pytorch (default malloc)",
          "torch_glibc": "pytorch + glibc env (MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_)",
          "torch_jemalloc": "pytorch + jemalloc (LD_PRELOAD)"}
# glibc reads these at start-up, before any thread exists, which is why they go through the
# environment: a malloc setting applied later would miss the arenas of already running threads.
GLIBC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
# jemalloc's "never give dirty pages back" (the counterpart of the glibc settings above).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def cores() -> int:
    """CPU cores this process may run on (what both frameworks are given)."""
    return len(os.sched_getaffinity(0))


def load_config(name: str):
    from elmjax.config import load_config_file

    config = load_config_file(ROOT / "configs" / f"{name}.py")
    if SHAPES[name]:
        config.train.batch_size, config.train.seq_len = SHAPES[name]
    config.train.grad_accum_steps = 1
    config.model.compute_dtype = config.model.param_dtype = "float32"
    config.model.remat_policy = "none"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    return config


def random_batch(config, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.train.seq_len)
    tokens = rng.integers(0, config.model.vocab_size, (shape[0], shape[1] + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, np.float32),
    }


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def serve(setup_info: dict, step, matmul) -> None:
    """Worker loop: print setup info, then answer `step` / `peak` / `quit` lines from the
    parent with one JSON line each, so the parent can interleave the frameworks in time."""
    print(json.dumps(setup_info), flush=True)
    for command in sys.stdin:
        command = command.strip()
        if command == "step":
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print(json.dumps({"seconds": seconds, "loss": loss, "page_faults": faults}), flush=True)
        elif command == "peak":
            matmul()  # warm
            seconds = min(_timed(matmul) for _ in range(3))
            print(json.dumps({"flops_per_sec": 2 * 2048**3 / seconds}), flush=True)
        else:
            print(json.dumps({"max_rss_gib": max_rss_gib()}), flush=True)
            return


def elmjax_step(config, on_params=None):
    """The benchmark's elmjax step on one device: (setup, train state, compiled step, compile
    seconds, batch, frozen variables). `on_params(params)` sees the fresh parameters before
    they become the state. Apply `train.reuse_host_memory` first: it must precede jax's start."""
    import jax

    from elmjax.training import step as ts
    from elmjax.training.setup import build_setup, compile_train_step, fresh_params, frozen_variables, global_batch

    setup = build_setup(config, jax.devices()[:1])
    params = fresh_params(setup)
    if on_params is not None:
        on_params(params)
    state = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer), out_shardings=setup.state_shardings)(params)
    del params
    compiled, compile_seconds = compile_train_step(setup)
    batch = global_batch(setup, random_batch(config))
    frozen = frozen_variables(setup)  # empty: full training freezes nothing
    return setup, state, compiled, compile_seconds, batch, frozen


def jax_worker(name: str, export_dir: str) -> None:
    """elmjax's train step; first exports its fresh parameters to `export_dir` (HF layout)
    so the PyTorch workers start from the very same weights."""
    from elmjax.training import host_memory

    config = load_config(name)
    # Before jax is imported and starts threads, as `python -m elmjax.train` does.
    reuse = host_memory.apply(config.train.reuse_host_memory)
    import jax
    import jax.numpy as jnp

    from elmjax.convert.export import export_params
    from elmjax.training.dry_run import memory_report
    from elmjax.training.loop_costs import counted_costs  # each loop body once, as XLA counts

    _, state, compiled, compile_seconds, batch, frozen = elmjax_step(
        config, on_params=lambda params: export_params(export_dir, config.model, params, target="torch",
                                                       dtype="float32", overwrite=True))
    holder = {"state": state}
    del state

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return float(jax.block_until_ready(metrics)["loss"])

    a = jnp.ones((2048, 2048), jnp.float32)
    matmul_fn = jax.jit(lambda x: x @ x)
    first_loss = step()  # warm-up
    serve({"compile_seconds": compile_seconds, "reuse_host_memory": reuse, "xla_flops": counted_costs(compiled).get("flops"),
           "xla_memory_gib": memory_report(compiled).get("total_bytes", 0) / 2**30, "first_loss": first_loss},
          step, lambda: matmul_fn(a).block_until_ready())


def torch_worker(name: str, export_dir: str, threads: int) -> None:
    """The PyTorch baseline as a user would run it eagerly: HF-style OpenELM with SDPA,
    fused AdamW, as many intra-op threads as cores. Allocator settings come from the
    environment the parent gives this process."""
    import torch

    from elmjax.models.openelm.torch_model import OpenELMForCausalLM

    torch.set_num_threads(threads)
    config = load_config(name)
    model = OpenELMForCausalLM.from_pretrained(export_dir, dtype=torch.float32).train()
    # Same hyper-parameters as configs' AdamW (the schedule's value does not change the cost).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1, fused=True)
    batch = random_batch(config)
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    z_loss = config.train.z_loss

    def step():
        logits = model(inputs)
        lse = torch.logsumexp(logits, dim=-1)
        ce = lse - logits.gather(-1, targets[..., None])[..., 0]
        loss = (ce + z_loss * lse.square()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    a = torch.ones(2048, 2048)
    first_loss = step()  # warm-up
    serve({"first_loss": first_loss, "torch_version": torch.__version__, "threads": torch.get_num_threads()},
          step, lambda: a @ a)


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class Worker:
    """A benchmark subprocess answering one JSON line per command."""

    def __init__(self, framework: str, name: str, args, export_dir: str):
        command = [sys.executable, __file__, f"--worker={framework}", f"--models={name}",
                   f"--threads={args.threads}", f"--export_dir={export_dir}"]
        environment = dict(os.environ, PYTHONPATH=str(ROOT))
        if framework == "jax":
            # The benchmark runs XLA:CPU; saying so keeps reuse_host_memory's "auto" on even
            # where an accelerator plugin (libtpu for the TPU dry runs) is installed.
            environment["JAX_PLATFORMS"] = "cpu"
        else:
            # OpenMP's default busy-wait makes PyTorch's 1-5x slower and erratic when another
            # job shares the cores (measured here: tiny fwd+bwd 1.0-5.2 s vs a steady 0.7 s);
            # passive waiting is what gives PyTorch its best on a shared host.
            environment["OMP_WAIT_POLICY"] = "PASSIVE"
        if framework == "torch_glibc":
            environment.update(GLIBC_ENV)
        if framework == "torch_jemalloc":
            environment.update(LD_PRELOAD=args.jemalloc, MALLOC_CONF=JEMALLOC_CONF)
        self.framework = framework
        self.process = subprocess.Popen(command, env=environment, cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=None, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.framework} worker died (rc {self.process.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> dict:
        result = self.ask("quit")
        self.process.wait()
        return result


def pair_rounds(jax_worker_: Worker, torch_worker_: Worker, rounds: int) -> dict:
    """`rounds` rounds of one step each, the order flipping every round. Returns per-round
    step records of both and their matmul peaks."""
    record = {"jax": [], "torch": [], "peaks": []}
    for index in range(rounds):
        order = [("jax", jax_worker_), ("torch", torch_worker_)]
        for key, worker in order if index % 2 == 0 else order[::-1]:
            record["peaks"].append(worker.ask("peak")["flops_per_sec"])
            record[key].append(worker.ask("step"))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,270m")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per PyTorch variant")
    parser.add_argument("--threads", type=int, default=cores(), help="PyTorch intra-op threads (default: cores)")
    parser.add_argument("--variants", default="torch,torch_glibc",
                        help=f"PyTorch rows, from {','.join(TORCH_VARIANTS)} (torch_jemalloc needs --jemalloc)")
    parser.add_argument("--jemalloc", default="", help="path of libjemalloc.so.2 for the torch_jemalloc row")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--worker", choices=("jax",) + TORCH_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--export_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "jax":
        return jax_worker(args.models, args.export_dir)
    if args.worker:
        return torch_worker(args.models, args.export_dir, args.threads)

    from elmjax.training.metrics import flops_per_token

    variants = args.variants.split(",")
    if "torch_jemalloc" in variants and not os.path.exists(args.jemalloc):
        parser.error("the torch_jemalloc row needs --jemalloc=PATH of libjemalloc.so.2")
    print(f"host: {cores()} cores, PyTorch threads {args.threads}; load average at start "
          f"{os.getloadavg()}", flush=True)
    rows, jax_rows = [], []
    for name in args.models.split(","):
        config = load_config(name)
        tokens = config.train.batch_size * config.train.seq_len
        spec_flops = flops_per_token(config.model, config.train.seq_len) * tokens
        export_dir = tempfile.mkdtemp(prefix=f"train_step_{name}_")
        try:
            # One PyTorch worker at a time next to the elmjax worker: the 270M processes take
            # 6-10 GB each, and this host's memory is shared.
            jax_w = Worker("jax", name, args, os.path.join(export_dir, "hf"))
            jax_steps, peaks = [], []
            for variant in variants:
                load_start = os.getloadavg()
                torch_w = Worker(variant, name, args, os.path.join(export_dir, "hf"))
                record = pair_rounds(jax_w, torch_w, args.rounds)
                torch_info = {**torch_w.info, **torch_w.close()}
                load_end = os.getloadavg()
                jax_steps += record["jax"]
                peaks += record["peaks"]
                ratios = [t["seconds"] / j["seconds"] for j, t in zip(record["jax"], record["torch"])]
                jax_s = statistics.median(s["seconds"] for s in record["jax"])
                torch_s = statistics.median(s["seconds"] for s in record["torch"])
                rows.append({
                    "model": name, "variant": LABELS[variant], "batch": f"{config.train.batch_size}x{config.train.seq_len}",
                    "rounds": args.rounds, "elmjax_tokens_per_sec": tokens / jax_s, "torch_tokens_per_sec": tokens / torch_s,
                    "elmjax_step_s": jax_s, "torch_step_s": torch_s, "round_ratios": ratios,
                    "median_ratio": statistics.median(ratios),
                    "elmjax_faults": statistics.median(s["page_faults"] for s in record["jax"]),
                    "torch_faults": statistics.median(s["page_faults"] for s in record["torch"]),
                    "torch_max_rss_gib": torch_info["max_rss_gib"], "torch_first_loss": torch_info["first_loss"],
                    "torch_threads": torch_info["threads"], "torch_version": torch_info["torch_version"],
                    "load_start": load_start, "load_end": load_end, "spec_flops": spec_flops,
                })
                print(f"{name} {variant}: rounds {', '.join(f'{r:.3f}' for r in ratios)}; load {load_start} -> "
                      f"{load_end}", flush=True)
            jax_info = {**jax_w.info, **jax_w.close()}
        finally:
            shutil.rmtree(export_dir, ignore_errors=True)
        peak = max(peaks)
        jax_rows.append({
            "model": name, "elmjax_first_loss": jax_info["first_loss"], "compile_seconds": jax_info["compile_seconds"],
            "xla_flops_over_spec": jax_info["xla_flops"] / spec_flops if jax_info.get("xla_flops") else None,
            "xla_memory_gib": jax_info["xla_memory_gib"], "max_rss_gib": jax_info["max_rss_gib"],
            "reuse_host_memory": jax_info["reuse_host_memory"], "matmul_peak_gflops": peak / 1e9,
            "elmjax_median_tokens_per_sec": tokens / statistics.median(s["seconds"] for s in jax_steps),
        })
        for row in rows:
            if row["model"] == name:
                row["elmjax_mfu"] = spec_flops / row["elmjax_step_s"] / peak
                row["torch_mfu"] = spec_flops / row["torch_step_s"] / peak

    print(f"load average at end {os.getloadavg()}")
    print("\n| model | PyTorch variant | batch | elmjax tok/s | PyTorch tok/s | elmjax / PyTorch (median of rounds) | "
          "per-round ratios | elmjax MFU | PyTorch MFU | page faults/step elmjax, PyTorch | PyTorch max RSS GiB | "
          "load avg (1 min) start -> end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['variant']} | {row['batch']} | {row['elmjax_tokens_per_sec']:,.1f} | "
              f"{row['torch_tokens_per_sec']:,.1f} | **{row['median_ratio']:.2f}x** | "
              f"{' '.join(f'{r:.2f}' for r in row['round_ratios'])} | {100 * row['elmjax_mfu']:.1f}% | "
              f"{100 * row['torch_mfu']:.1f}% | {row['elmjax_faults']:,.0f}, {row['torch_faults']:,.0f} | "
              f"{row['torch_max_rss_gib']:.2f} | {row['load_start'][0]:.2f} -> {row['load_end'][0]:.2f} |")
    print("\n| model | elmjax compile s | XLA FLOPs / SPEC | XLA mem GiB | elmjax max RSS GiB | reuse_host_memory | "
          "fp32 matmul peak GFLOP/s | first-step loss elmjax | first-step loss PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in jax_rows:
        torch_losses = ", ".join(f"{r['torch_first_loss']:.5f}" for r in rows if r["model"] == row["model"])
        flops = "-" if row["xla_flops_over_spec"] is None else f"{row['xla_flops_over_spec']:.3f}"
        print(f"| {row['model']} | {row['compile_seconds']:.1f} | {flops} | {row['xla_memory_gib']:.2f} | "
              f"{row['max_rss_gib']:.2f} | {'on' if row['reuse_host_memory'] else 'off'} | "
              f"{row['matmul_peak_gflops']:.1f} | {row['elmjax_first_loss']:.5f} | {torch_losses} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "elmjax": jax_rows}, indent=1))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
