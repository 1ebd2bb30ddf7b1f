#!/usr/bin/env bash
# The GPU checks of this project, for whoever next has a GPU (works offline):
#
#   bash perf/run_gpu.sh                 # every stage: tests solve step tune (~15 minutes on an H100)
#   bash perf/run_gpu.sh tests solve     # ~7 minutes  } the same in two commands, for tools that cap
#   bash perf/run_gpu.sh step tune       # ~8 minutes  } one command at 10 minutes
#
# Stages:
#   tests  the whole test suite on the GPU (MBF_TEST_MODE=full, the @pytest.mark.gpu tests included)
#   solve  perf/bench_solve.py: fused solve+update vs torch.linalg batched paths, b x block count sweep
#   step   perf/bench_step.py: training iteration / optimizer step, MBF vs Adam(fused) and SGD
#   tune   python -m mbf_triton tune: autotuner sweeps of the fused update and of the statistics kernels,
#          tuned vs heuristic timed again after each sweep (issue 4's check)
#   nccl   (2+ GPUs; not in the default list; NOT YET RUN: the lent machines have one GPU) data-parallel MBF
#          on NCCL: examples/data_parallel.py under torchrun on every GPU, DDP replicated, DDP with sharded
#          curvature and FSDP2 (the last two also with graft="adam" and kl_clip), each against one process
#          on the global batch (--check-parity, rel. diff below 1e-4 passes), and the three plain modes'
#          losses must agree
# The stages write into a fresh work folder; ${OUT:-perf/out} then gets at most 8 files: summary.md,
# results.tar.gz (every CSV, plot, summary and log), the three plots and the three main CSVs, so that
# tools which bring back only a few files get all of it. The summary comes last on stdout. Stages keep
# going after a failure; the exit status is non-zero if one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf/out}
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests solve step tune)
for s in "${STAGES[@]}"; do
  case "$s" in tests|solve|step|tune|nccl) ;; *) echo "unknown stage '$s' (tests solve step tune nccl)"; exit 2;; esac
done
mkdir -p "$OUT"
OUTPUTS=(summary.md results.tar.gz solve_speedup.png step_time.png autotune.png solve.csv step.csv
         autotune_summary.csv)
for f in "${OUTPUTS[@]}"; do rm -f "$OUT/$f"; done  # nothing of an earlier run is mistaken for this one
LOGS=$(mktemp -d)   # logs, autotune cache
WORK=$(mktemp -d)   # the stages' CSVs, plots and summaries
trap 'rm -rf "$LOGS" "$WORK"' EXIT
unset TRITON_INTERPRET
export MBF_TEST_MODE=full PYTHONUNBUFFERED=1
# a fresh autotune cache: the sweep and the step benchmark tune from scratch, and nothing stale is trusted
export MBF_TRITON_CACHE_DIR=${MBF_TRITON_CACHE_DIR:-$LOGS/autotune-cache}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  echo "stages: ${STAGES[*]}"
} 2>&1 | tee "$LOGS/env.log"

$PY -m pip install --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1
install_rc=$?
if [ "$install_rc" -ne 0 ]; then
  tail -n 20 "$LOGS/install.log"; echo "install failed (rc=$install_rc)"
  tar -czf "$OUT/results.tar.gz" -C "$LOGS" . ; exit 1
fi

declare -A RC
run_stage() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  SECONDS=0
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  RC[$name]=${PIPESTATUS[0]}
  echo "$name: rc=${RC[$name]} in ${SECONDS}s (124 = hard timeout at ${limit}s)" | tee -a "$LOGS/stages.log"
}

for s in "${STAGES[@]}"; do
  case "$s" in
    tests) # pytest-xdist, where installed, compiles the kernels of different tests in parallel
           XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
           run_stage tests "${TEST_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider $XDIST tests ;;
    solve) run_stage solve "${SOLVE_TIMEOUT:-240}" $PY perf/bench_solve.py --out "$WORK" --no-progress \
             --time-budget-s "${SOLVE_BUDGET:-180}" --rep-ms 60 --warmup-ms 15 ;;
    step)  run_stage step "${STEP_TIMEOUT:-170}" $PY perf/bench_step.py --out "$WORK" --no-progress \
             --time-budget-s "${STEP_BUDGET:-130}" ;;
    tune)  run_stage tune "${TUNE_TIMEOUT:-200}" $PY -m mbf_triton tune --out "$WORK" --b 4 9 16 25 32 64 \
             --blocks 100000 1000000 --time-budget-s "${TUNE_BUDGET:-140}"
           # the statistics kernels (fp32 FMA vs 3xTF32 tensor-core dots among the candidates), smaller sizes
           run_stage tune_stats "${TUNE_STATS_TIMEOUT:-150}" $PY -m mbf_triton tune --out "$WORK/tune_stats" \
             --kernel linear_stats conv_stats --b 9 16 --blocks 10000 --samples 128 --positions 256 \
             --time-budget-s "${TUNE_STATS_BUDGET:-100}" ;;
    nccl)  NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
           if [ "${NGPU:-0}" -lt 2 ]; then
             echo "nccl: needs 2+ GPUs, found ${NGPU:-0}: not run" | tee -a "$LOGS/stages.log"; RC[nccl]=0
           else
             for m in replicated sharded fsdp sharded_graft fsdp_graft; do
               flag=$(case $m in sharded) echo --shard-curvature;; fsdp) echo --fsdp;;
                      sharded_graft) echo --shard-curvature --graft adam --kl-clip 1e-3;;
                      fsdp_graft) echo --fsdp --graft adam --kl-clip 1e-3;; esac)
               run_stage "nccl_$m" "${NCCL_TIMEOUT:-180}" $PY -m torch.distributed.run --nproc-per-node="$NGPU" \
                 examples/data_parallel.py --epochs 2 --check-parity $flag
               err=$(sed -n 's/.*max relative parameter difference \([0-9.e+-]*\).*/\1/p' "$LOGS/nccl_$m.log")
               ok=$($PY -c "print(int('$err' != '' and float('$err') < 1e-4))")
               echo "nccl_$m: parity with one process: ${err:-missing} ($([ "$ok" = 1 ] && echo pass || echo FAIL))" \
                 | tee -a "$LOGS/stages.log"
               [ "$ok" = 1 ] || RC[nccl_$m]=1
             done
             losses=$(for m in replicated sharded fsdp; do grep '^epoch 1' "$LOGS/nccl_$m.log" | cut -d'(' -f1; done \
                      | sort -u | wc -l)
             echo "nccl: the three modes' final losses $([ "$losses" = 1 ] && echo agree || echo DIFFER)" \
               | tee -a "$LOGS/stages.log"
             RC[nccl]=$([ "$losses" = 1 ] && echo 0 || echo 1)
           fi ;;
  esac
done

{
  echo
  echo "================================ SUMMARY ================================"
  cat "$LOGS/env.log"
  cat "$LOGS/stages.log"
  [ -f "$LOGS/tests.log" ] && echo "tests: $(tail -n 1 "$LOGS/tests.log")"
  for f in solve_summary.md step_summary.md; do [ -f "$WORK/$f" ] && { echo; cat "$WORK/$f"; }; done
  for t in tune tune_stats; do
    if [ -f "$LOGS/$t.log" ]; then
      echo; echo "## Autotune sweep: $t (tuned vs heuristic, timed again after the sweep)"
      sed -n '/^summary/,/^wrote/p' "$LOGS/$t.log"
    fi
  done
} 2>&1 | tee "$OUT/summary.md"

case "$MBF_TRITON_CACHE_DIR" in "$LOGS"/*) ;; *) cp -r "$MBF_TRITON_CACHE_DIR" "$LOGS/autotune-cache" 2>/dev/null ;; esac
cp "$OUT/summary.md" "$WORK/"
mkdir -p "$WORK/logs" && cp -r "$LOGS"/. "$WORK/logs/"
tar -czf "$OUT/results.tar.gz" -C "$WORK" .
for f in "${OUTPUTS[@]:2}"; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
done
for s in "${!RC[@]}"; do [ "${RC[$s]}" -eq 0 ] || exit 1; done
