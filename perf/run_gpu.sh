#!/usr/bin/env bash
# One command for whoever next has a GPU (offline is fine):   bash perf/run_gpu.sh
# Installs this checkout, runs the GPU test suite in full mode, then the kernel sweep and the step
# benchmark in full mode; everything is logged under ${OUT:-perf/out}; a short summary comes last.
# Budget: ~9 minutes on an H100 (each stage has an internal time budget and a hard timeout).
# Stages keep going after a failure; the exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export MBF_TEST_MODE=full

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
} 2>&1 | tee "$OUT/env.log"

$PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tee "$OUT/install.log"
install_rc=$?
if [ "$install_rc" -ne 0 ]; then echo "install failed (rc=$install_rc), see $OUT/install.log"; exit 1; fi

SECONDS=0
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q tests 2>&1 | tee "$OUT/tests.log"
tests_rc=$?
echo "tests: rc=$tests_rc in ${SECONDS}s"

SECONDS=0
timeout "${SOLVE_TIMEOUT:-240}" $PY perf/bench_solve.py --out "$OUT" --no-progress \
  --time-budget-s "${SOLVE_BUDGET:-180}" --rep-ms 60 --warmup-ms 15 2>&1 | tee "$OUT/bench_solve.log"
solve_rc=$?
echo "bench_solve: rc=$solve_rc in ${SECONDS}s"

SECONDS=0
timeout "${STEP_TIMEOUT:-170}" $PY perf/bench_step.py --out "$OUT" --no-progress \
  --time-budget-s "${STEP_BUDGET:-130}" 2>&1 | tee "$OUT/bench_step.log"
step_rc=$?
echo "bench_step: rc=$step_rc in ${SECONDS}s"

{
  echo
  echo "================================ SUMMARY ================================"
  echo "tests: rc=$tests_rc  ($(tail -n 1 "$OUT/tests.log"))"
  echo "bench_solve: rc=$solve_rc   bench_step: rc=$step_rc   (124 = hard timeout)"
  cat "$OUT/solve_summary.md" 2>/dev/null || echo "no solve summary (see $OUT/bench_solve.log)"
  echo
  cat "$OUT/step_summary.md" 2>/dev/null || echo "no step summary (see $OUT/bench_step.log)"
  echo "CSV/plots: $OUT/solve.csv $OUT/solve_speedup.png $OUT/step.csv $OUT/step_time.png"
} 2>&1 | tee "$OUT/summary.md"

[ "$tests_rc" -eq 0 ] && [ "$solve_rc" -eq 0 ] && [ "$step_rc" -eq 0 ]
