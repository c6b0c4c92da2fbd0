#!/usr/bin/env bash
# One GPU check, < 6 minutes on one H100/H200: build the CUDA extension, run the GPU tests
# (pytest -m gpu through benchmarks/gpu_tests.sh, which goes on past a crashing test: the op's
# backends, and the trainer, scorer and RL reward on CUDA), then the GPU
# benchmark. Logs and JSON go to $OUT (else benchmarks/results),
# the card, versions and each phase's exit status and seconds to gpu_check_summary.txt there.
#   GPU_TESTS_K, GPU_TEST_FILES   which GPU tests (see benchmarks/gpu_tests.sh; default: all)
#   BENCH_ARGS    extra arguments of benchmarks/bench_gpu.py
#   BUILD_TIMEOUT, GPU_TESTS_TIMEOUT, BENCH_TIMEOUT  seconds per phase (default 150 + 240 + 160,
#                 under the device tool's 600 s per command; the build took 59 s on the H200). A
#                 phase past its limit gets SIGINT, so pytest still prints which tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/gpu_check_summary.txt"
summary() { echo "$*" | tee -a "$OUT_DIR/gpu_check_summary.txt"; }  # each phase's rc and seconds
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" PREFKERNELS_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee -a "$OUT_DIR/gpu_check_summary.txt"  # 8 files in all: what the device tool brings back

start=$(date +%s)
timeout "${BUILD_TIMEOUT:-150}" python3 -m pip install -e . --no-build-isolation --no-deps -q \
  --disable-pip-version-check > "$OUT_DIR/gpu_build.log" 2>&1
build_rc=$?
summary "build rc=$build_rc in $(( $(date +%s) - start ))s"
if [ $build_rc -ne 0 ]; then tail -60 "$OUT_DIR/gpu_build.log"; exit $build_rc; fi
python3 -c 'from prefkernels import backends; print("native CUDA:", backends.native_has_cuda(), "triton:", backends.triton_ops() is not None)'

start=$(date +%s)
bash benchmarks/gpu_tests.sh "$OUT_DIR/gpu_tests.log"  # goes on past a test that crashes the process
tests_rc=$?
grep -E "passed|failed|Error|error|gpu tests:" "$OUT_DIR/gpu_tests.log" | tail -25
summary "gpu tests rc=$tests_rc in $(( $(date +%s) - start ))s"

start=$(date +%s)
timeout -s INT -k 15 "${BENCH_TIMEOUT:-160}" python3 benchmarks/bench_gpu.py --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
summary "bench rc=$bench_rc in $(( $(date +%s) - start ))s"
exit $(( tests_rc || bench_rc ))
