#!/usr/bin/env bash
# On a GPU machine: build the extension, run the GPU tests and the benchmark, write logs to the
# directory given as the argument and print a short table last.
#   scripts/gpu_run.sh OUT_DIR [bench arguments...]
# Python wheels the machine lacks (expecttest) may be carried in .whl/.
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUT_DIR [bench arguments...]}
shift
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import deep_ep_ops; print(deep_ep_ops.build_info())" | tee "$out/build_info.txt"
timeout ${GPU_TESTS_TIMEOUT_S:-420} python3 -m pytest -q -m gpu --durations=12 tests > "$out/gpu_tests.log" 2>&1
tests_rc=$?
tail -25 "$out/gpu_tests.log"
timeout ${BENCH_TIMEOUT_S:-240} python3 -m deep_ep_ops.bench --out "$out/bench" "$@" > "$out/bench.log" 2> "$out/bench.err"
bench_rc=$?
[ $bench_rc -ne 0 ] && tail -20 "$out/bench.err"
echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
cat "$out/bench/table.txt" 2>/dev/null
