#!/usr/bin/env bash
# The GPU tests of gpu_check.sh, going on past a crash: pytest -m gpu over GPU_TEST_FILES, each
# test's id recorded as it starts (benchmarks/pytest_progress.py). When a test kills the process
# (a signal: segfault, abort), that test is named, and pytest runs again over the tests not yet
# started, at most 3 times, so one crashing test does not hide the results of the rest.
#   usage: benchmarks/gpu_tests.sh LOG
#   GPU_TEST_FILES     test files (default: tests/test_gpu.py tests/test_triton.py tests/test_gpu_training.py)
#   GPU_TESTS_K        pytest -k expression (default: all)
#   GPU_TESTS_MARK     pytest -m expression (default: gpu)
#   GPU_TESTS_TIMEOUT  seconds for all runs together (default 240; past it pytest gets SIGINT)
# Exit status: pytest's of the last run, or 139 if any test crashed.
set -uo pipefail
cd "$(dirname "$0")/.."
log="$1"
: > "$log"
export PYTEST_PROGRESS_FILE
PYTEST_PROGRESS_FILE="$(mktemp)"
trap 'rm -f "$PYTEST_PROGRESS_FILE"' EXIT
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
deadline=$(( $(date +%s) + ${GPU_TESTS_TIMEOUT:-240} ))
crashed=0
for attempt in 1 2 3 4; do
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -le 0 ]; then echo "gpu tests: out of time before run $attempt" | tee -a "$log"; rc=124; break; fi
  timeout -s INT -k 15 "$left" python3 -X faulthandler -m pytest -m "${GPU_TESTS_MARK-gpu}" -q --maxfail=15 \
    -p no:cacheprovider -p pytest_progress --durations=15 -k "${GPU_TESTS_K:-}" \
    ${GPU_TEST_FILES:-tests/test_gpu.py tests/test_triton.py tests/test_gpu_training.py} >> "$log" 2>&1
  rc=$?
  if [ "$rc" -lt 128 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; then break; fi  # not a crash: done, timed out or stopped
  crashed=1
  echo "gpu tests: run $attempt died (exit $rc) in $(tail -n 1 "$PYTEST_PROGRESS_FILE"); going on after it" \
    | tee -a "$log"
done
if [ "$crashed" -eq 1 ] && [ "$rc" -eq 0 ]; then rc=139; fi
exit "$rc"
