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
