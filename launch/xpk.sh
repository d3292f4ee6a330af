#!/usr/bin/env bash
# GKE with xpk (https://github.com/AI-Hypercomputer/xpk): run training as an xpk workload on
# TPU slices or GPU nodes, then watch or delete it.
#
#   launch/xpk.sh tpu|gpu CONFIG WORKDIR      create the workload
#   launch/xpk.sh delete                      delete it (the checkpoints stay in WORKDIR)
#
# Prerequisites: `pip install xpk`, gcloud authenticated, an xpk cluster (`xpk cluster create
# --cluster CLUSTER --tpu-type v5p-32 ...` or `--device-type h100-80gb-8 ...`), an image
# with elmjax pushed to a registry the cluster reads (launch/Dockerfile), WORKDIR on gs://.
# Settings (environment): CLUSTER (elmjax), WORKLOAD (elmjax-run), IMAGE (required for
# tpu/gpu), ZONE, PROJECT (optional, else gcloud's), TPU_TYPE (v5p-32), NUM_SLICES (1),
# DEVICE_TYPE (h100-80gb-8), NUM_NODES (2), DRY_RUN (set: print the commands).
# Re-creating the workload with the same CONFIG and WORKDIR resumes from the newest checkpoint.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # run (or print with DRY_RUN), required

required "${1:-}" "usage: launch/xpk.sh tpu|gpu CONFIG WORKDIR, or launch/xpk.sh delete"
ACTION=${1}
CLUSTER=${CLUSTER:-elmjax}
WORKLOAD=${WORKLOAD:-elmjax-run}
location=(--cluster="${CLUSTER}")
if [[ -n ${ZONE:-} ]]; then location+=(--zone="${ZONE}"); fi
if [[ -n ${PROJECT:-} ]]; then location+=(--project="${PROJECT}"); fi

if [[ ${ACTION} == delete ]]; then
  run xpk workload delete --workload="${WORKLOAD}" "${location[@]}"
  exit 0
fi
if [[ ${ACTION} != tpu && ${ACTION} != gpu ]]; then
  echo "error: unknown action ${ACTION}; use tpu, gpu or delete" >&2  # before asking for IMAGE
  exit 2
fi
required "${2:-}" "missing CONFIG (e.g. configs/3b.py)"
CONFIG=${2}
required "${3:-}" "missing WORKDIR (e.g. gs://BUCKET/runs/3b)"
WORKDIR=${3}
required "${IMAGE:-}" "set IMAGE to an image built from launch/Dockerfile"
TRAIN="python -m elmjax.train --config=${CONFIG} --workdir=${WORKDIR}"

case "${ACTION}" in
  tpu)
    # GKE sets TPU_WORKER_HOSTNAMES and TPU_WORKER_ID (and MEGASCALE_* for several slices)
    # in every pod; --distributed reads them.
    run xpk workload create --workload="${WORKLOAD}" "${location[@]}" --docker-image="${IMAGE}" \
      --tpu-type="${TPU_TYPE:-v5p-32}" --num-slices="${NUM_SLICES:-1}" \
      --command="${TRAIN} --distributed"
    ;;
  gpu)
    # jax's Kubernetes detection needs the `kubernetes` package and pod-listing rights; the
    # pods' own variables avoid both: xpk's GPU JobSets set JAX_COORDINATOR_ADDRESS,
    # JAX_COORDINATOR_PORT, NNODES and NODE_RANK (one process per node, all its GPUs).
    run xpk workload create --workload="${WORKLOAD}" "${location[@]}" --docker-image="${IMAGE}" \
      --device-type="${DEVICE_TYPE:-h100-80gb-8}" --num-nodes="${NUM_NODES:-2}" \
      --command="${TRAIN} --coordinator=\${JAX_COORDINATOR_ADDRESS}:\${JAX_COORDINATOR_PORT} --num_processes=\${NNODES} --process_id=\${NODE_RANK}"
    ;;
esac
