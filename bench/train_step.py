"""Train-step benchmark: elmjax vs a PyTorch OpenELM, side by side in one run, on this host.

For each model (tiny, 270m) it runs, each in its own subprocess (so memory and thread
settings do not mix):
  jax          elmjax's compiled train step (forward, backward, AdamW; float32; one device),
               with `train.reuse_host_memory` applied as `python -m elmjax.train` does
  torch        elmjax.models.openelm.torch_model (same shapes) + torch.optim.AdamW, float32
  torch_reuse  (--torch_reuse_host_memory) the same PyTorch step with elmjax's glibc settings
and reports tokens/s, MFU against this CPU's measured float32 matmul peak, compile time,
peak memory, and the FLOPs of the compiled XLA step (cost analysis) next to SPEC §4's count.

  PYTHONPATH=. python bench/train_step.py                 # tiny and 270m, 3 timed steps
  PYTHONPATH=. python bench/train_step.py --models=tiny,270m --steps=4 --torch_reuse_host_memory

FLOPs convention: SPEC §4 (6 * non-embedding matmul weights + 6 * seq * q_heads * head_dim
per layer) plus 6 * vocab * model_dim for the tied output matmul.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": None, "270m": (4, 256)}  # (batch, seq); None = the config's own
FRAMEWORKS = ("jax", "torch", "torch_reuse")
LABELS = {"jax": "elmjax", "torch": "pytorch", "torch_reuse": "pytorch + glibc reuse"}


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
    parent with one JSON line each, so the parent can interleave the two frameworks in time
    (this shared CPU's load drifts; alternating keeps the comparison fair)."""
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


def jax_worker(name: str) -> None:
    from elmjax.training import host_memory

    config = load_config(name)
    # Before jax is imported and starts threads, as `python -m elmjax.train` does.
    reuse = host_memory.apply(config.train.reuse_host_memory)
    import jax
    import jax.numpy as jnp

    from elmjax.training import step as ts
    from elmjax.training.dry_run import compiled_flops, memory_report
    from elmjax.training.setup import build_setup, compile_train_step, fresh_params, global_batch

    setup = build_setup(config, jax.devices()[:1])
    holder = {"state": jax.jit(lambda p: ts.init_train_state(p, setup.optimizer),
                               out_shardings=setup.state_shardings)(fresh_params(setup))}
    compiled, compile_seconds = compile_train_step(setup)
    batch = global_batch(setup, random_batch(config))

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return float(jax.block_until_ready(metrics)["loss"])

    a = jnp.ones((2048, 2048), jnp.float32)
    matmul_fn = jax.jit(lambda x: x @ x)
    step()  # warm-up
    serve({"compile_seconds": compile_seconds, "reuse_host_memory": reuse, "xla_flops": compiled_flops(compiled),
           "xla_memory_gib": memory_report(compiled).get("total_bytes", 0) / 2**30},
          step, lambda: matmul_fn(a).block_until_ready())


def torch_worker(name: str, threads: int, reuse_host_memory: bool) -> None:
    from elmjax.training import host_memory

    if reuse_host_memory:  # elmjax's glibc settings, before torch starts threads
        host_memory.keep_freed_host_memory()
    import torch

    from elmjax.convert.hf import hf_config
    from elmjax.models.openelm.torch_model import OpenELMForCausalLM, OpenELMTorchConfig

    torch.set_num_threads(threads)
    config = load_config(name)
    model = OpenELMForCausalLM(OpenELMTorchConfig.from_dict(hf_config(config.model, "float32")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batch = random_batch(config)
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()

    def step():
        logits = model(inputs)
        lse = torch.logsumexp(logits, dim=-1)
        ce = lse - logits.gather(-1, targets[..., None])[..., 0]
        loss = (ce + 1e-4 * lse.square()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    a = torch.ones(2048, 2048)
    step()  # warm-up
    serve({}, step, lambda: a @ a)


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class Worker:
    """A benchmark subprocess answering one JSON line per command."""

    def __init__(self, framework: str, name: str, args):
        command = [sys.executable, __file__, f"--worker={framework}", f"--models={name}",
                   f"--threads={args.threads}"]
        environment = dict(os.environ, PYTHONPATH=str(ROOT))
        self.framework = framework
        self.process = subprocess.Popen(command, env=environment, cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,270m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    parser.add_argument("--torch_reuse_host_memory", action="store_true",
                        help="add a PyTorch row with elmjax's glibc memory-reuse settings")
    parser.add_argument("--worker", choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "jax":
        return jax_worker(args.models)
    if args.worker in ("torch", "torch_reuse"):
        return torch_worker(args.models, args.threads, reuse_host_memory=args.worker == "torch_reuse")

    from elmjax.training.metrics import flops_per_token

    rows = []
    for name in args.models.split(","):
        config = load_config(name)
        tokens = config.train.batch_size * config.train.seq_len
        spec_flops = flops_per_token(config.model, config.train.seq_len) * tokens
        frameworks = ["jax", "torch"] + (["torch_reuse"] if args.torch_reuse_host_memory else [])
        workers = [Worker(framework, name, args) for framework in frameworks]
        steps = {w.framework: [] for w in workers}
        peaks = {w.framework: [] for w in workers}
        for _ in range(args.steps):  # alternate, so all see the same drifting load
            for worker in workers:
                peaks[worker.framework].append(worker.ask("peak")["flops_per_sec"])
                steps[worker.framework].append(worker.ask("step"))
        results = {}
        for worker in workers:
            fastest = min(steps[worker.framework], key=lambda step: step["seconds"])
            results[worker.framework] = {**worker.info, **worker.close(), "step_time": fastest["seconds"],
                                         "page_faults": fastest["page_faults"],
                                         "matmul_peak": max(peaks[worker.framework])}
        # The CPU's float32 peak: the best 2048^3 matmul any framework reached in this run.
        peak = max(result["matmul_peak"] for result in results.values())
        for framework, result in results.items():
            tokens_per_sec = tokens / result["step_time"]
            rows.append({
                "model": name, "framework": LABELS[framework],
                "batch": f"{config.train.batch_size}x{config.train.seq_len}",
                "tokens_per_sec": tokens_per_sec, "step_time": result["step_time"],
                "mfu": spec_flops / result["step_time"] / peak,
                "own_matmul_peak_gflops": result["matmul_peak"] / 1e9,
                "page_faults_per_step": result["page_faults"],
                "compile_seconds": result.get("compile_seconds"),
                "xla_flops_over_spec": (result["xla_flops"] / spec_flops) if result.get("xla_flops") else None,
                "xla_memory_gib": result.get("xla_memory_gib"), "max_rss_gib": result["max_rss_gib"],
                "speed_vs_pytorch": results["torch"]["step_time"] / result["step_time"],
                "reuse_host_memory": result.get("reuse_host_memory"),
            })
    print("| model | framework | batch | tokens/s | step s | vs PyTorch | MFU (SPEC §4 / fp32 matmul peak) | "
          "own matmul peak GFLOP/s | page faults/step | compile s | XLA FLOPs / SPEC | XLA mem GiB | "
          "max RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)
        print(f"| {row['model']} | {row['framework']} | {row['batch']} | {row['tokens_per_sec']:,.1f} | "
              f"{row['step_time']:.2f} | {row['speed_vs_pytorch']:.2f}x | {100 * row['mfu']:.1f}% | "
              f"{row['own_matmul_peak_gflops']:.1f} | {row['page_faults_per_step']:,} | "
              f"{fmt(row['compile_seconds'], '.1f')} | "
              f"{fmt(row['xla_flops_over_spec'], '.3f')} | {fmt(row['xla_memory_gib'], '.2f')} | "
              f"{row['max_rss_gib']:.2f} |")
    for row in rows:
        if row["framework"] == "elmjax":
            print(f"{row['model']}: elmjax ran with reuse_host_memory {'on' if row['reuse_host_memory'] else 'off'}")
            print(f"{row['model']}: elmjax step is {row['speed_vs_pytorch']:.2f}x PyTorch's speed")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
