#!/usr/bin/env bash
# Runs cpp_engine as NUM_RANKS processes (default 2) that exchange their strings through a
# fresh directory; ranks beyond the GPUs share them (with CUDA MPS for NVSHMEM and CUDA IPC
# between processes on one GPU). Exits non-zero when any rank fails.
set -uo pipefail
cd "$(dirname "$0")"
ranks=${1:-2}
dir=$(mktemp -d "${TMPDIR:-/tmp}/cpp_engine.XXXXXX")
trap 'rm -rf "$dir"' EXIT
pids=()
for ((rank = 0; rank < ranks; rank++)); do
  timeout 300 ./cpp_engine "$rank" "$ranks" "$dir" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
