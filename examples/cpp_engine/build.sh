#!/usr/bin/env bash
# Builds examples/cpp_engine/cpp_engine against the installed deep_ep_ops (a CUDA build of it).
# Python only prints the flags (deep_ep_ops.cpp_api); the program runs without it.
set -euo pipefail
cd "$(dirname "$0")"
flags=$(python3 -m deep_ep_ops.cpp_api --cflags --libs)  # fails with a message on a CPU-only install
# shellcheck disable=SC2086
${CXX:-g++} -O2 main.cpp -o cpp_engine $flags
echo "built $(pwd)/cpp_engine"
