#!/usr/bin/env bash
# Nsight Compute counters of one fwd+bwd step per case of benchmarks/gpu_probe.py (the fill
# kernels against PyTorch's fill, the memset-path kernels, explicit pairs), after gpu_check.sh:
# one ncu run per case into $OUT/ncu_CASE.csv (7 files), then one table of every kernel into
# $OUT/gpu_probe_summary.txt and stdout. About 2 minutes on an H200; ncu needs a machine whose
# runtime lets it read the counters (Firecracker, not gVisor: device/KINDS.md).
#   PROBE_CASES   the cases to run (default: all, `python3 benchmarks/gpu_probe.py --cases`)
#   PROBE_TIMEOUT seconds per case (default 60)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)"
if [ -z "$NCU" ]; then echo "gpu_probe: no ncu on PATH or in /usr/local/cuda/bin"; exit 1; fi
if ! python3 -c 'from prefkernels import backends; assert backends.native_has_cuda()' 2>/dev/null; then
  python3 -m pip install -e . --no-build-isolation --no-deps -q --disable-pip-version-check || exit 1
fi
export PYTHONUNBUFFERED=1 PREFKERNELS_CHECK_VALUES=0  # the graph's kernels only: no value checks
logs=()
for case in ${PROBE_CASES:-$(python3 benchmarks/gpu_probe.py --cases)}; do
  start=$(date +%s)
  timeout -k 10 "${PROBE_TIMEOUT:-60}" "$NCU" --profile-from-start off --clock-control none --csv \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    --log-file "$OUT_DIR/ncu_$case.csv" python3 benchmarks/gpu_probe.py "$case" > /dev/null 2> "$OUT_DIR/ncu_err.txt"
  echo "gpu_probe: $case rc=$? in $(( $(date +%s) - start ))s"
  tail -3 "$OUT_DIR/ncu_err.txt"
  logs+=("$OUT_DIR/ncu_$case.csv")
done
rm -f "$OUT_DIR/ncu_err.txt"
python3 benchmarks/gpu_probe.py --summary "${logs[@]}" | tee "$OUT_DIR/gpu_probe_summary.txt"
