"""Time and peak memory of tools/export.py on an OpenELM-270M-sized checkpoint (random weights).

    python bench/export_270m.py [--dir /tmp/elmjax_export_bench] [--cases torch,mlx,mlx-q4,torch-bf16]

Each case runs in a fresh process. Measured side by side in that same kind of process:
"restore" (read the parameters with `restore_params`, nothing else) and "raw dump" (restore,
then write the same bytes to one file with `ndarray.tofile`: the floor for any exporter).
"cpu s" is the process's user + system CPU time (less sensitive to a busy machine than wall
time). Peak memory is the process's RSS high-water mark (VmHWM); "over baseline" subtracts the RSS after imports and is
compared with one float32 copy of the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

_MEASURE = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
import numpy as np
from elmjax.training.checkpoint import restore_params
from elmjax.convert.export import export_checkpoint
from elmjax.data.tokenizer_choice import load_tokenizer

def status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

case, workdir, out = {case!r}, {workdir!r}, {out!r}
baseline = status_bytes("VmRSS")
start, cpu_start = time.perf_counter(), sum(os.times()[:2])
if case == "restore":
    config, params = restore_params(workdir)
elif case == "raw dump":
    config, params = restore_params(workdir)
    with open(out, "wb") as f:
        stack = [params]
        while stack:
            node = stack.pop()
            for value in node.values():
                stack.append(value) if isinstance(value, dict) else np.asarray(value).tofile(f)
else:
    target, _, variant = case.partition("-")
    kwargs = dict(quantize=4, group_size=64) if variant == "q4" else {{}}
    if variant == "bf16":
        kwargs["dtype"] = "bfloat16"
    export_checkpoint(workdir, out, target=target, **kwargs)
seconds, cpu = time.perf_counter() - start, sum(os.times()[:2]) - cpu_start
peak = status_bytes("VmHWM")  # this process's peak (ru_maxrss would carry the parent's over exec)
print(json.dumps(dict(case=case, seconds=seconds, cpu=cpu, peak=peak, baseline=baseline)))
"""


def make_checkpoint(workdir: str) -> int:
    """A params-only 270M checkpoint with random float32 weights; returns the weight bytes."""
    from elmjax.training.checkpoint import latest_complete_step, save_params_checkpoint
    from elmjax.data.tokenizer_choice import load_tokenizer
    from elmjax.layers.decoder import abstract_model, count_params
    from tests.export_support import random_params

    from elmjax.config import load_config_file

    config = load_config_file(os.path.join(_REPO, "configs", "270m.py"))
    load_tokenizer(config)  # train + cache the 32000-piece tokenizer outside the timings
    nbytes = count_params(abstract_model(config.model)) * 4
    if latest_complete_step(workdir) is None:
        save_params_checkpoint(workdir, config, random_params(config.model, seed=0), step=0)
    return nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/elmjax_export_bench")
    parser.add_argument("--cases", default="restore,raw dump,torch,torch-bf16,mlx,mlx-q4")
    args = parser.parse_args()
    workdir = os.path.join(args.dir, "workdir")
    nbytes = make_checkpoint(workdir)
    repo = _REPO
    print(f"weights: {nbytes / 2**30:.3f} GiB float32 (one copy)")
    print(f"{'case':<12} {'seconds':>8} {'cpu s':>6} {'x restore':>10} {'x raw dump':>11} {'peak RSS GiB':>13} {'(peak-baseline)/weights':>24}")
    results = {}
    for case in args.cases.split(","):
        out = os.path.join(args.dir, "out-" + case.replace(" ", "_"))
        shutil.rmtree(out, ignore_errors=True)
        if os.path.isfile(out):
            os.remove(out)
        code = _MEASURE.format(repo=repo, case=case, workdir=workdir, out=out)
        line = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        result = json.loads(line.strip().splitlines()[-1])
        results[case] = result
        ratios = [
            result["seconds"] / results[ref]["seconds"] if ref in results else float("nan")
            for ref in ("restore", "raw dump")
        ]
        print(
            f"{case:<12} {result['seconds']:8.2f} {result['cpu']:6.1f} {ratios[0]:10.2f} {ratios[1]:11.2f} {result['peak'] / 2**30:13.2f} "
            f"{(result['peak'] - result['baseline']) / nbytes:24.2f}"
        )


if __name__ == "__main__":
    main()
