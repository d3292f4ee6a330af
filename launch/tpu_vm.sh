#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install elmjax on every worker, train, stop, delete.
#
#   launch/tpu_vm.sh create|install|train|stop|delete CONFIG WORKDIR
#
# Prerequisites: gcloud (authenticated, `gcloud config set project ...`), TPU quota in ZONE,
# WORKDIR on gs:// (every worker reads and writes the same checkpoints).
# Settings (environment): TPU_NAME (default elmjax), ZONE (us-east5-a), ACCELERATOR_TYPE
# (v5p-32), RUNTIME_VERSION (v2-alpha-tpuv5), NUM_SLICES (1; >1 = multislice), SPOT (set:
# spot capacity), DRY_RUN (set: print the commands instead of running them).
# `install` copies this checkout's HEAD commit (git archive) to every worker and pip-installs it.
# Re-running `train` with the same CONFIG and WORKDIR resumes from the newest checkpoint.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # run (or print with DRY_RUN), required

required "${1:-}" "usage: launch/tpu_vm.sh create|install|train|stop|delete CONFIG WORKDIR"
ACTION=${1}
required "${2:-}" "missing CONFIG (e.g. configs/3b.py)"
CONFIG=${2}
required "${3:-}" "missing WORKDIR (e.g. gs://BUCKET/runs/3b)"
WORKDIR=${3}
TPU_NAME=${TPU_NAME:-elmjax}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
NUM_SLICES=${NUM_SLICES:-1}

# The training command every worker runs: one process per TPU VM host; --distributed lets
# jax.distributed.initialize() read the workers and this worker's id from the TPU metadata
# (and, multislice, the MEGASCALE_* variables), so no flag differs between workers.
TRAIN="python -m elmjax.train --config=${CONFIG} --workdir=${WORKDIR} --distributed"

# The TPU VMs: one node, or NUM_SLICES nodes named TPU_NAME-0, TPU_NAME-1, ... (multislice).
nodes() {
  if (( NUM_SLICES == 1 )); then
    echo "${TPU_NAME}"
  else
    for (( i = 0; i < NUM_SLICES; i++ )); do echo "${TPU_NAME}-${i}"; done
  fi
}

on_all_workers() {
  local command=$1 node pid failed=0
  local pids=()
  for node in $(nodes); do
    run gcloud compute tpus tpu-vm ssh "${node}" --zone="${ZONE}" --worker=all --command="${command}" &
    pids+=($!)
  done
  # A bare `wait` returns 0 whatever the ssh sessions returned: wait for each, keep a failure.
  for pid in "${pids[@]}"; do
    wait "${pid}" || failed=$?
  done
  return "${failed}"
}

case "${ACTION}" in
  create)
    placement=(--node-id="${TPU_NAME}")
    if (( NUM_SLICES > 1 )); then placement=(--node-count="${NUM_SLICES}" --node-prefix="${TPU_NAME}"); fi
    run gcloud compute tpus queued-resources create "${TPU_NAME}" --zone="${ZONE}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" \
      "${placement[@]}" ${SPOT:+--spot}
    ;;
  install)
    run git archive --format=tar.gz --output=/tmp/elmjax.tar.gz HEAD
    for node in $(nodes); do
      run gcloud compute tpus tpu-vm scp /tmp/elmjax.tar.gz "${node}":elmjax.tar.gz --zone="${ZONE}" --worker=all
    done
    on_all_workers "set -e; mkdir -p elmjax; tar -xzf elmjax.tar.gz -C elmjax; cd elmjax; pip install -e '.[tpu]'"
    ;;
  train)
    on_all_workers "cd elmjax && ${TRAIN}"
    ;;
  stop)
    # SIGTERM: the processes agree on a step, save a checkpoint there and exit 4 (not finished;
    # `train` again resumes).
    on_all_workers "pkill -TERM -f 'elmjax.train' || true"
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "${TPU_NAME}" --zone="${ZONE}" --force --quiet
    ;;
  *)
    echo "error: unknown action ${ACTION}; use create, install, train, stop or delete" >&2
    exit 2
    ;;
esac
