#!/usr/bin/env bash
# The GPU check every change runs on a GPU machine (docs/measuring.md):
# build + install the package offline, run the GPU tests, then the benchmarks
# when there are any.
#
# Usage: scripts/gpu_check.sh OUTDIR
#   PYTHON=...    interpreter (default python3)
#   SKIP_BENCH=1  stop after the tests (e.g. to fit a short time limit)
#   SKIP_TESTS=1  no GPU tests (e.g. benchmarks in a second call)
#   DEMO_STEPS=N  steps of the demo run (default 20; 0 skips it)
#   TESTS="..."   pytest targets (default: tests)
#   PRESSURE=1    also run the pressure tests (pytest -m "gpu and
#                 pressure" on TESTS), output in pressure.log
#   SANITIZE=N    draws of each family of tests/workers/shape_fuzz.py under
#                 compute-sanitizer memcheck and racecheck, and
#                 scripts/sanitize_intranode.py under memcheck, at R = the
#                 GPUs or 2 on one GPU (default 4; 0 skips them)
#   TUNE_ARGS=".." also run the tuner, python -m jax_ep.tune, with these
#                 arguments (one process over every GPU; e.g. "--sms 24
#                 --send-warps 8 --chunks 0 --copy-engine 1" times one
#                 tuning), output in tune.log, its entry in tuned_config.json
#   PROBES=1      also run the fp8 cast probes (bench/probes/e4m3_cvt.cu,
#                 scripts/fp8_cast_probe.py), output in probes.log
#   CEILINGS=1    also measure the NVLink write ceilings between all local
#                 GPUs (bench/probes/nvlink_write.cu), output in ceilings.log
#   EXAMPLES=1    also the examples' GPU figures: python -m bench.experts
#                 (experts.log, experts.json), DeepSeek-V3's layer trained
#                 (main.py --config dsv3_gpu, bf16 and fp8 dispatch, and
#                 bf16 as two overlapped micro-batches:
#                 dsv3_train*.log/json) and decoding (decode.py on the
#                 kernels, one process per GPU: decode.log/json)
#   OVERLAP=1     also python -m bench.overlap (dispatch + combine beside
#                 independent matmuls, on XLA's other streams or not:
#                 overlap.log, overlap.json) with XLA's optimized HLO and
#                 thunk sequences of each variant in overlap_dump.tgz
#   INTERNODE_BENCH=1  also python -m bench on the internode kernels, nodes
#                 of G ranks (R = 2, G = 1 and R = 4, G = 2 sharing a GPU
#                 where there is one; else R = the GPUs, G = R / 2), jax_ep
#                 only: on shared GPUs it shows the path runs, not its speed
#                 (bench_internode_r*.log/json)
#
# Writes into OUTDIR (flat):
#   env.txt         GPUs, topology, driver, Python/JAX/nvcc versions
#   build.log       pip install -v output, including ptxas register/spill report
#   pytest_gpu.log  pytest -m "gpu and not pressure" -x -v tests
#   pressure.log    the pressure tests (PRESSURE)
#   sanitize_memcheck.log, sanitize_racecheck.log, sanitize_intranode.log
#                   the sanitizer runs (SANITIZE)
#   demo.log        the Flax MoE demo (make demo's command), DEMO_STEPS steps
#   bench.log       python -m bench, one process per GPU as `make bench` runs
#   bench.json      its records; only when bench/__main__.py exists
#   bench_ll.log, bench_ll.json   the low-latency benchmark (shape dsv3_ll),
#                   kernel times from the profiler included
#   tune.log, tuned_config.json   the tuner's table and entry (TUNE_ARGS)
#   ceilings.log    NVLink write ceilings, every GPU sending (CEILINGS)
#   summary.txt     one line per step, also printed at the end
# On a one-GPU machine the whole check needs three 10-minute device calls:
#   SANITIZE=0 SKIP_BENCH=1 DEMO_STEPS=0 \
#       TESTS="--ignore=tests/cuda/test_internode_gpu.py tests" \
#       scripts/gpu_check.sh OUT/tests
#       (the GPU tests, multi-rank ones at R = 2, 4 and 8 sharing the GPU)
#   SKIP_TESTS=1 SANITIZE=2 PRESSURE=1 SKIP_BENCH=1 DEMO_STEPS=0 \
#       scripts/gpu_check.sh OUT/pressure
#       (the pressure tests of both families, then the sanitizers at R = 2)
#   SANITIZE=0 SKIP_BENCH=1 DEMO_STEPS=0 \
#       TESTS=tests/cuda/test_internode_gpu.py scripts/gpu_check.sh OUT/inter
#       (the internode tests at every (nodes, ranks per node) up to R = 8,
#       the low-latency kernels beside them, the exchange in pieces)
# and, for the figures, SKIP_TESTS=1 SANITIZE=0 EXAMPLES=1 OVERLAP=1 ...
# Where the caller takes back at most 8 files (the device tool), write to a
# scratch folder and tar it into the returned one:
#   scripts/gpu_check.sh /tmp/o/x; tar czf "$OUT/x.tgz" -C /tmp/o x
# Measured on one H200 (2026-12-02): build 20-25 s; GPU tests 385-482 s
# (the shape fuzz at R = 1 alone 50-82 s, by its draws); sanitizers with
# SANITIZE=2 about 90 s; pressure runs of 10,000 pairs at R = 2 203-219 s
# (low-latency) and 246 s (intranode), of 200 at R = 8 32 and 37 s, which
# is why tests/support/gpu_testing.py's PRESSURE_PAIRS is 7,500 at R = 2
# (427 s of pressure in all at 56adfbb, 523 s for the second call with the
# sanitizers); the internode file's 9 tests of 67bd3a6 173 s, its steps and
# low-latency tests at the six topologies 205 s (d4cf3d4), the whole file
# (16 tests) about 250 s at 75669bb; EXAMPLES=1 about 150 s; OVERLAP=1
# about 15 s. A machine's start took 40 s, but a call's lease counted about
# 140 s more than its command on 2026-12-02 (held time, not start alone).
# Exit status: 0 when every step that ran passed. A failed build stops the
# run; failed tests do not stop the benchmarks.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# NVLink multicast stays off in every process (docs/processes.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1

failed=0
: >"$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
# pytest's last line: "=== 3 passed, 1 skipped in 9.1s ==="
summary_line='^=+ .*(passed|failed|error|skipped|no tests ran).* =+$'

# Runs "$@" under a time limit with output to a log; returns its status.
run_logged() {
  local log=$1 limit=$2
  shift 2
  local rc=0
  timeout "$limit" "$@" >"$OUT/$log" 2>&1 || rc=$?
  return "$rc"
}

# An optional step: run_logged LOG LIMIT "$@", then a summary line for NAME.
optional_step() {
  local name=$1 log=$2 limit=$3
  shift 3
  if run_logged "$log" "$limit" "$@"; then
    note "$name: ok, see $log"
  else
    note "$name: FAILED (exit $?), see $log"
    failed=1
  fi
}

# --- ENV ---------------------------------------------------------------------
{
  date -u
  git log -1 --format='commit %H %s' 2>/dev/null || true
  git status --short 2>/dev/null || true
  nvidia-smi || true
  nvidia-smi topo -m || true
  "$PYTHON" --version || true
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())' ||
    true
  nvcc --version || true
} >"$OUT/env.txt" 2>&1

# --- BUILD -------------------------------------------------------------------
start=$SECONDS
if run_logged build.log 600 "$PYTHON" -m pip install -v --no-build-isolation \
    --no-deps -e . --config-settings=cmake.define.JAX_EP_VERBOSE_PTXAS=ON; then
  note "build: ok ($((SECONDS - start)) s)"
else
  note "build: FAILED (exit $?, $((SECONDS - start)) s), see build.log"
  exit 1
fi

# --- TESTS -------------------------------------------------------------------
if [[ "${SKIP_TESTS:-0}" == 1 ]]; then
  note "pytest: skipped (SKIP_TESTS=1)"
else
  # shellcheck disable=SC2086  # TESTS is a list of targets
  if run_logged pytest_gpu.log 600 "$PYTHON" -m pytest \
      -m "gpu and not pressure" -x -v --durations=25 ${TESTS:-tests}; then
    rc=0
  else
    rc=$?
    failed=1
  fi
  note "pytest (exit $rc): $(grep -E "$summary_line" "$OUT/pytest_gpu.log" |
    tail -n 1 || echo 'no summary line, see pytest_gpu.log')"
fi

# --- PRESSURE ----------------------------------------------------------------
if [[ "${PRESSURE:-0}" == 1 ]]; then
  # shellcheck disable=SC2086  # TESTS is a list of targets
  if run_logged pressure.log 600 "$PYTHON" -m pytest -m "gpu and pressure" \
      -x -v --durations=0 ${TESTS:-tests}; then
    rc=0
  else
    rc=$?
    failed=1
  fi
  note "pressure (exit $rc): $(grep -E "$summary_line" "$OUT/pressure.log" |
    tail -n 1 || echo 'no summary line, see pressure.log')"
fi

# --- SANITIZER ---------------------------------------------------------------
# At R = 2 or more: with one GPU, two ranks share it. Every kernel is
# instrumented: with `--kernel-name kns=jax_ep` (ours only) compute-sanitizer
# (CUDA 13.0) segfaulted once the NVSHMEM heap was open (seen on one H200).
# A bad access or a race fails the step (exit 9). racecheck serializes a
# process's kernels, so it runs the push way of the intranode kernels only
# (the copy-engine way's flag kernel runs beside the main kernel).
if [[ "${SANITIZE:-4}" == 0 ]]; then
  note "sanitizers: skipped (SANITIZE=0)"
else
  num_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  ranks=$(( num_gpus < 2 ? 2 : num_gpus ))
  seed=$(( (RANDOM << 15) | RANDOM ))
  sanitize() {  # TOOL LOG SCRIPT ARGS...: the script under the tool, R ranks
    local tool=$1 log=$2 rc=0
    shift 2
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONFAULTHANDLER=1 \
      run_logged "$log" 600 "$PYTHON" -m jax_ep.launch -n "$ranks" \
      --ranks-per-gpu $(( ranks / num_gpus )) -- \
      compute-sanitizer --tool "$tool" --error-exitcode 9 \
      --report-api-errors no "$PYTHON" "$@" || rc=$?
    [[ $rc == 0 ]] || failed=1
    note "$tool $(basename "$1") (exit $rc, R=$ranks on $num_gpus GPUs):" \
      "$(grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$log" | sort |
      uniq -c | tr -s ' \n' ' ')$(grep -h 'died of' "$OUT/$log" || true)"
  }
  fuzz=(tests/workers/shape_fuzz.py --seed "$seed" --draws "${SANITIZE:-4}")
  note "sanitizers: shape_fuzz.py seed $seed, ${SANITIZE:-4} draws per family"
  sanitize memcheck sanitize_memcheck.log "${fuzz[@]}"
  sanitize racecheck sanitize_racecheck.log "${fuzz[@]}"
  sanitize memcheck sanitize_intranode.log scripts/sanitize_intranode.py
fi

# --- TUNER -------------------------------------------------------------------
if [[ -n "${TUNE_ARGS:-}" ]]; then
  # shellcheck disable=SC2086  # TUNE_ARGS is a list of arguments
  optional_step tuner tune.log 600 \
    "$PYTHON" -m jax_ep.tune $TUNE_ARGS --out "$OUT/tuned_config.json"
fi

# --- PROBES ------------------------------------------------------------------
if [[ "${PROBES:-0}" == 1 ]]; then
  optional_step probes probes.log 300 bash -c "nvcc -std=c++17 -arch=sm_90 \
    -O3 bench/probes/e4m3_cvt.cu -o '$OUT/e4m3_cvt' && '$OUT/e4m3_cvt' &&
    '$PYTHON' scripts/fp8_cast_probe.py"
fi

# --- CEILINGS ----------------------------------------------------------------
if [[ "${CEILINGS:-0}" == 1 ]]; then
  optional_step ceilings ceilings.log 300 bash -c "nvcc -std=c++17 \
    -arch=sm_90 -O3 bench/probes/nvlink_write.cu -o /tmp/jax_ep_nvlink_write &&
    /tmp/jax_ep_nvlink_write"
fi

# --- DEMO --------------------------------------------------------------------
if [[ "${DEMO_STEPS:-20}" == 0 ]]; then
  note "demo: skipped (DEMO_STEPS=0)"
else
  num_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  if run_logged demo.log 600 "$PYTHON" -m jax_ep.launch -n "$num_gpus" -- \
      "$PYTHON" examples/moe/main.py --steps "${DEMO_STEPS:-20}"; then
    note "demo: ok ($num_gpus processes): $(grep -E '^done' "$OUT/demo.log")"
  else
    note "demo: FAILED (exit $?), see demo.log"
    failed=1
  fi
fi

# --- EXAMPLES ----------------------------------------------------------------
if [[ "${EXAMPLES:-0}" == 1 ]]; then
  num_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  optional_step "bench.experts" experts.log 600 \
    "$PYTHON" -m bench.experts --out "$OUT/experts.json"
  for run in fp8_false fp8_true fp8_false_overlap; do
    fp8=$(echo "$run" | cut -d_ -f2)
    overlap=$([[ "$run" == *_overlap ]] && echo true || echo false)
    optional_step "dsv3 train ($run)" "dsv3_train_$run.log" \
      600 "$PYTHON" -m jax_ep.launch -n "$num_gpus" -- "$PYTHON" \
      examples/moe/main.py --config dsv3_gpu --steps 30 --fp8_dispatch $fp8 \
      --overlap_micro_batches $overlap \
      --metrics_out "$OUT/dsv3_train_$run.json"
    grep -hE '^done' "$OUT/dsv3_train_$run.log" | tee -a "$OUT/summary.txt"
  done
  optional_step decode decode.log 600 "$PYTHON" -m jax_ep.launch \
    -n "$num_gpus" -- "$PYTHON" examples/moe/decode.py --new_tokens 32 \
    --metrics_out "$OUT/decode.json"
  grep -hE '^decoded' "$OUT/decode.log" | tee -a "$OUT/summary.txt"
fi

# --- OVERLAP -----------------------------------------------------------------
if [[ "${OVERLAP:-0}" == 1 ]]; then
  num_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  dump=$(mktemp -d)
  optional_step "bench.overlap" overlap.log 600 "$PYTHON" -m jax_ep.launch \
    -n "$num_gpus" -- "$PYTHON" -m bench.overlap --dump "$dump" --profile \
    --out "$OUT/overlap.json"
  (cd "$dump" && find . \( -name '*after_optimizations.txt' -o \
    -name '*thunk_sequence*.txt' \) -print0 |
    tar czf "$OUT/overlap_dump.tgz" --null -T -) || true
fi

# --- INTERNODE BENCH ----------------------------------------------------------
if [[ "${INTERNODE_BENCH:-0}" == 1 ]]; then
  num_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  if (( num_gpus == 1 )); then topologies="2:1 4:2"; else
    topologies="$num_gpus:$(( num_gpus / 2 ))"; fi
  for t in $topologies; do
    r=${t%:*} g=${t#*:}
    optional_step "bench internode R=$r G=$g" "bench_internode_r$r.log" 600 \
      "$PYTHON" -m jax_ep.launch -n "$r" --ranks-per-gpu $(( r / num_gpus )) \
      -- "$PYTHON" -m bench --ranks-per-node "$g" --impls jax_ep --reps 5 \
      --out "$OUT/bench_internode_r$r.json"
  done
fi

# --- BENCH -------------------------------------------------------------------
if [[ "${SKIP_BENCH:-0}" == 1 ]]; then
  note "bench: skipped (SKIP_BENCH=1)"
elif [[ -f bench/__main__.py ]]; then
  num_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
  if run_logged bench.log 600 "$PYTHON" -m jax_ep.launch -n "$num_gpus" -- \
      "$PYTHON" -m bench --out "$OUT/bench.json"; then
    note "bench: ok ($num_gpus GPUs), records in bench.json"
  else
    note "bench: FAILED (exit $?), see bench.log"
    failed=1
  fi
  if run_logged bench_ll.log 600 "$PYTHON" -m jax_ep.launch -n "$num_gpus" -- \
      "$PYTHON" -m bench --shape dsv3_ll \
      --ops ll_dispatch,ll_combine,ll_dispatch_combine,ll_overlap --profile \
      --out "$OUT/bench_ll.json"; then
    note "bench (low-latency): ok ($num_gpus GPUs), records in bench_ll.json"
  else
    note "bench (low-latency): FAILED (exit $?), see bench_ll.log"
    failed=1
  fi
else
  note "bench: skipped (no bench/__main__.py)"
fi

exit "$failed"
