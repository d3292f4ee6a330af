# Shared by the launch scripts (sourced, not run).
# shellcheck shell=bash

# Runs a command, or with DRY_RUN set prints it quoted as a shell line instead (what the
# tests render and check).
run() {
  if [[ -n ${DRY_RUN:-} ]]; then
    local line
    printf -v line '%q ' "$@"
    echo "${line}"  # one write, so parallel runs print whole lines
  else
    "$@"
  fi
}

# `required VALUE MESSAGE`: prints `error: MESSAGE` and exits 2, the trainer's code for a
# usage mistake, when VALUE is empty (bash's own ${x:?} exits 1, which reads as a failed run).
required() {
  if [[ -z $1 ]]; then
    echo "error: $2" >&2
    exit 2
  fi
}
