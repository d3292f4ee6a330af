#!/usr/bin/env bash
# One prepared accelerator check for a session that is lent a GPU (bench/README.md, "Accelerator
# check"). Three stages, each under its own time limit so the whole run ends inside 8 minutes:
#   1. kernel   bench/kernel_check.py: the compiled Pallas flash-attention kernel vs the
#               float32 reference, forward and gradients (dq, dk, dv)
#   2. attention bench/attention.py: fwd and fwd+bwd time of pallas vs xla vs cudnn, seq 1k-16k
#   3. step     bench/accel_train_step.py: OpenELM-1.1B's train step in bf16, tokens/s and MFU
# Results (logs, JSON rows, summary.md with every table) go to $OUT (default ./accel_out).
#
#   bash bench/accelerator.sh fetch     # here, with network: wheels the device image lacks -> .whl/
#   bash bench/accelerator.sh           # on the GPU machine (carry .whl)
#   ACCEL_DRY=1 bash bench/accelerator.sh   # any CPU: every stage at tiny sizes, interpret mode
#
# A failed stage does not stop the others (a kernel that fails to compile is itself a result);
# the exit status is the number of failed stages.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
# elmjax needs these at import and the device image (python 3.12, jax 0.11.2) lacks them;
# their other requirements (absl-py, cloudpickle, etils, numpy, protobuf, pyyaml) are there.
WHEEL_PINS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0)

fetch_wheels() {
    mkdir -p "$WHEELS"
    # The device machine runs CPython 3.12 on x86-64 Linux; --no-deps: only the missing ones.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${WHEEL_PINS[@]}"
}

if [[ "${1:-}" == "fetch" ]]; then
    fetch_wheels
    exit $?
fi

DRY="${ACCEL_DRY:-0}"
OUT="${OUT:-$ROOT/accel_out}"
mkdir -p "$OUT"
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1
if [[ "$DRY" == "1" ]]; then
    export JAX_PLATFORMS=cpu
fi

export PYTHONPATH="$ROOT"
# Only where elmjax's import-time needs are missing (the device image): the carried wheels go
# to a private target, ahead of the image's packages on the path. A machine that has them
# (this development host, CI) installs nothing.
if ! python3 -c 'import grain, ml_collections' 2> /dev/null; then
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "grain / ml_collections missing and no wheels in $WHEELS: run 'bash bench/accelerator.sh fetch'" \
            "where pip reaches an index, and carry .whl" >&2
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/elmjax_site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/elmjax_site:$ROOT"
fi

{
    date -u
    python3 -c 'import sys; print("python", sys.version.split()[0])'
    python3 -c 'import importlib.metadata as m
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")'
    python3 -c 'import jax; print("devices:", jax.devices())'
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

failed=0
# stage NAME LIMIT_SECONDS COMMAND...: runs one stage with a hard limit, its output kept in
# $OUT/NAME.log; a stage that fails or runs out of time counts as failed.
stage() {
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
    if [[ $status -ne 0 ]]; then
        failed=$((failed + 1))
    fi
}

if [[ "$DRY" == "1" ]]; then
    stage kernel 120 python3 bench/kernel_check.py --dry --json "$OUT/kernel.json"
    stage attention 120 python3 bench/attention.py --seqs 64,128 --impls pallas,xla --iters 1 \
        --batch 1 --heads 2 --kv-heads 1 --head-dim 32 --dtype float32 --json "$OUT/attention.json"
    stage step 120 python3 bench/accel_train_step.py --dry --json "$OUT/step.json"
else
    # Limits sum to 440 s; with the install and start-up the script ends inside 8 minutes.
    stage kernel 110 python3 bench/kernel_check.py --json "$OUT/kernel.json"
    # batch 2, 16 query / 4 kv heads, head_dim 128, bf16, causal (attention.py's GPU defaults).
    stage attention 140 python3 bench/attention.py --seqs 1024,2048,4096,8192,16384 \
        --impls pallas,xla,cudnn --iters 10 --json "$OUT/attention.json"
    stage step 190 python3 bench/accel_train_step.py --config=1_1b --batch=8 --seq=2048 --steps=8 \
        --dtype=bfloat16 --impls=auto,xla --json "$OUT/step.json"
fi

# One file with every table: the lines of the logs that are markdown tables or their captions.
{
    echo "# Accelerator check ($(date -u +%Y-%m-%dT%H:%MZ), dry=$DRY, failed stages: $failed)"
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    for name in kernel attention step; do
        echo
        echo "## $name"
        echo
        grep -E '^\||^measured|^device|^flash|^batch|within tolerance|^=== ' "$OUT/$name.log" || true
    done
} > "$OUT/summary.md"
echo "summary: $OUT/summary.md (failed stages: $failed)"
exit "$failed"
