#!/usr/bin/env bash
# On a GPU machine: build the extensions, run the GPU tests and the benchmark, write logs to the
# directory given as the argument and print a short table last.
#   scripts/gpu_run.sh OUT_DIR [extra bench arguments...]
# Environment: GPU_TESTS (pytest targets, default "tests"; "none" skips the tests), GPU_TESTS_K
# (a pytest -k expression),
# BENCH_MODES (default "normal low-latency"; "none" skips the benchmark), EXAMPLES (1: run the
# two decode examples on every GPU, the default; 0: skip), GPU_TESTS_TIMEOUT_S, BENCH_TIMEOUT_S,
# DEEP_EP_OPS_GPU_WORLD_SIZES (e.g. "4": the multi-GPU tests at 4 ranks only), and DEEPEP (an
# unpacked DeepEP V1 tree, e.g. .deepep: build DeepEP there and run its tests against DeepEP and
# against this package, scripts/deepep_suite.py; DEEPEP_PROCESSES ranks, default: the GPUs;
# DEEPEP_TESTS, DEEPEP_INTRANODE_ARGS: passed on; DEEPEP_TESTS=none: no suite; DEEPEP_HOST=1:
# scripts/host_vs_deepep.py at DEEPEP_HOST_RANKS ranks, default 2, under MPS on one GPU), and
# CPP_ENGINE=1 (build examples/cpp_engine and run it at CPP_ENGINE_RANKS ranks, default 2).
# Python wheels the machine lacks (expecttest) may be carried in .whl/. SAVE_PREBUILT=1 packs
# each built extension into OUT_DIR/<source hash>.<name>.tar.xz; carried back in .prebuilt/
# they are used instead of a rebuild while the sources (deep_ep_ops/_sources.py) are unchanged.
# One GPU, many ranks: with fewer GPUs than the multi-rank tests' largest world size (default
# "2,4" on one GPU), the tests run several ranks per GPU under CUDA MPS; this script starts the
# MPS control daemon (pipe and log directories under /tmp) for the tests and stops it after
# them (and when it exits, failure included); the bench and the examples run without it.
# DEEP_EP_OPS_GPU_SHARE=0 turns the mode off (those tests skip).
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUT_DIR [extra bench arguments...]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the prebuilt archives are written from elsewhere
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
num_gpus=$(nvidia-smi -L | wc -l)
mps_started=0
start_mps() {  # one GPU: the multi-rank tests share it under CUDA MPS (only during the tests)
  [ "$num_gpus" -lt 2 ] && [ "${DEEP_EP_OPS_GPU_SHARE:-1}" != 0 ] || return 0
  export DEEP_EP_OPS_GPU_WORLD_SIZES=${DEEP_EP_OPS_GPU_WORLD_SIZES:-2,4}
  export DEEP_EP_OPS_GPU_TEST_SCALE=${DEEP_EP_OPS_GPU_TEST_SCALE:-0.1}  # one GPU for every rank
  command -v nvidia-cuda-mps-control > /dev/null && [ -z "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || return 0
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/deep_ep_ops_mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/deep_ep_ops_mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    mps_started=1
    trap stop_mps EXIT
    echo "one-GPU multi-rank mode: CUDA MPS started (ranks ${DEEP_EP_OPS_GPU_WORLD_SIZES})"
  else
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "one-GPU multi-rank mode: CUDA MPS did not start (the test harness tries again)"
  fi
}
stop_mps() {  # the daemon this script started, and nothing else
  [ "$mps_started" = 1 ] || return 0
  echo quit | nvidia-cuda-mps-control
  # Its logs only when the tests failed (few files come back from a device call), and not
  # beside prebuilt archives.
  [ "${tests_rc:-0}" != 0 ] && [ "${SAVE_PREBUILT:-0}" != 1 ] &&
    cp -r "$CUDA_MPS_LOG_DIRECTORY" "$out/mps-log" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  mps_started=0
}
start=$(date +%s)
key=$(python3 deep_ep_ops/_sources.py)
rm -f deep_ep_ops/_C*.so deep_ep_ops/lib/*.so  # an older build's files would shadow these
if compgen -G ".prebuilt/$key.*.tar.xz" > /dev/null; then  # built from these very sources
  DEEP_EP_OPS_NO_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . \
    > "$out/build.log" 2>&1 || { echo "PREBUILT INSTALL FAILED"; exit 1; }
  for archive in .prebuilt/"$key".*.tar.xz; do tar -xJf "$archive" -C deep_ep_ops || exit 1; done
  echo "build: prebuilt extensions of sources $key ($(( $(date +%s) - start )) s)"
else
  if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
    grep -B2 -A8 "error" "$out/build.log" | head -60; echo "BUILD FAILED"; exit 1
  fi
  echo "build: $(( $(date +%s) - start )) s"
  if [ "${SAVE_PREBUILT:-0}" = 1 ]; then  # for a later call: carry them back as .prebuilt/
    for so in deep_ep_ops/_C*.so deep_ep_ops/lib/*.so; do  # one archive each (the files that come back are small)
      name=$(basename "$so" | cut -d. -f1)
      (cd deep_ep_ops && XZ_OPT="-T0 -9" tar -cJf "$out/$key.$name.tar.xz" "${so#deep_ep_ops/}")
      echo "prebuilt: $out/$key.$name.tar.xz ($(stat -c %s "$out/$key.$name.tar.xz") bytes)"
    done
  fi
fi
python3 -c "import deep_ep_ops; print(deep_ep_ops.build_info())" | tee "$out/build_info.txt"
deepep_rc=""
if [ -n "${DEEPEP:-}" ]; then
  ranks=${DEEPEP_PROCESSES:-$(nvidia-smi -L | wc -l)}
  start=$(date +%s)
  # CUDA 13 keeps CCCL (which NVSHMEM's headers include) under include/cccl.
  if (cd "$DEEPEP" && NVCC_APPEND_FLAGS="-I$CUDA_HOME/include/cccl" \
      CPLUS_INCLUDE_PATH="$CUDA_HOME/include/cccl" TORCH_CUDA_ARCH_LIST=9.0 \
      MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace) > "$out/deepep_build.log" 2>&1; then
    echo "DeepEP build: $(( $(date +%s) - start )) s"
    if [ "${DEEPEP_HOST:-0}" = 1 ]; then  # host time per normal-mode call, ours beside DeepEP's
      start_mps
      timeout 300 python3 scripts/host_vs_deepep.py --deepep "$DEEPEP" \
        --num-ranks "${DEEPEP_HOST_RANKS:-2}" > "$out/host_vs_deepep.txt" 2>&1
      deepep_rc="$deepep_rc host=$?"
      stop_mps
    fi
    [ "${DEEPEP_TESTS:-}" = none ] || for impl in ours deepep; do
      timeout "${DEEPEP_TIMEOUT_S:-900}" python3 scripts/deepep_suite.py --deepep "$DEEPEP" \
        --impl $impl --num-processes "$ranks" --timeout-s "${DEEPEP_TEST_TIMEOUT_S:-300}" \
        --intranode-args "${DEEPEP_INTRANODE_ARGS:-}" --tests ${DEEPEP_TESTS:-intranode low_latency} \
        --out "$out" > "$out/deepep-$impl.txt" 2>&1
      deepep_rc="$deepep_rc $impl=$?"
    done
  else
    grep -B2 -A8 "error" "$out/deepep_build.log" | head -40; echo "DEEPEP BUILD FAILED"
    deepep_rc=" build-failed"
  fi
fi
engine_rc=""
if [ "${CPP_ENGINE:-0}" = 1 ]; then  # the C++ example engine, no Python in its processes
  if examples/cpp_engine/build.sh > "$out/cpp_engine_build.log" 2>&1; then
    start_mps
    examples/cpp_engine/run.sh "${CPP_ENGINE_RANKS:-2}" > "$out/cpp_engine.log" 2>&1
    engine_rc=" cpp_engine=$?"
    stop_mps
    cat "$out/cpp_engine.log"
  else
    tail -30 "$out/cpp_engine_build.log"; engine_rc=" cpp_engine=build-failed"
  fi
fi
tests_rc=skipped
if [ "${GPU_TESTS:-tests}" != none ]; then
  start_mps
  # shellcheck disable=SC2086
  # SIGINT first: pytest still prints the failures and the slowest tests when time runs out.
  export DEEP_EP_OPS_FAULT_TABLE="$out/faults.tsv"  # the fault tests' errors and times (tests/fault_table.py)
  rm -f "$DEEP_EP_OPS_FAULT_TABLE"
  timeout -s INT -k 30 "${GPU_TESTS_TIMEOUT_S:-420}" python3 -m pytest -v -rfE --tb=short -m gpu \
    --durations=15 ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} ${GPU_TESTS:-tests} > "$out/gpu_tests.log" 2>&1
  tests_rc=$?
  stop_mps  # the bench and the examples run without MPS
  grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20
fi
bench_rc=""
for mode in ${BENCH_MODES:-normal low-latency}; do
  [ "$mode" = none ] && break
  sweep=(); [ "$mode" = normal ] && sweep=(--num-sms 16 24 32)
  timeout "${BENCH_TIMEOUT_S:-240}" python3 -m deep_ep_ops.bench --mode "$mode" "${sweep[@]}" \
    --out "$out/bench-$mode" "$@" > "$out/bench-$mode.log" 2> "$out/bench-$mode.err"
  rc=$?
  bench_rc="$bench_rc $mode=$rc"
  [ $rc -ne 0 ] && tail -20 "$out/bench-$mode.err"
done
examples_rc=""
if [ "${EXAMPLES:-1}" = 1 ]; then
  for example in decode_cuda_graph decode_compiled; do
    timeout 150 python3 "examples/$example.py" > "$out/$example.log" 2>&1
    examples_rc="$examples_rc $example=$?"
    tail -1 "$out/$example.log"
  done
fi
[ -s "$out/faults.tsv" ] && { echo "fault table (case, backend, ranks, rank, s, error):"; cut -c1-220 "$out/faults.tsv"; }
echo "gpu tests rc=$tests_rc bench rc:$bench_rc examples rc:$examples_rc deepep suite rc:$deepep_rc$engine_rc"
for impl in ours deepep; do cat "$out/deepep-$impl.txt" 2>/dev/null; done
tail -12 "$out/host_vs_deepep.txt" 2>/dev/null
for mode in ${BENCH_MODES:-normal low-latency}; do
  [ "$mode" = none ] || cat "$out/bench-$mode/table.txt" 2>/dev/null
done
