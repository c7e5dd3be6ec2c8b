#!/usr/bin/env bash
# Per-kernel GPU times of the intranode kernels, without a timeline profiler
# (the GPU machines have Nsight Compute but not Nsight Systems).
#
# Usage: scripts/profile_intranode.sh OUTDIR [python -m bench arguments]
#   default bench arguments: --tokens 4096 --impls jax_ep
#     --ops dispatch,combine --dtypes bf16 --iters 5 --reps 2 --warmup 1
#
# Two processes, one GPU each (python -m jax_ep.launch). Rank 0 runs under
# ncu collecting only gpu__time_duration: one pass, no kernel replay, so a
# kernel that waits for the other GPU still meets its peer (a replay would
# restore memory and wait for flags that never come). ncu serializes rank
# 0's launches, so a Barrier's time includes waiting for rank 1; the copy and
# receive kernels' times are their own. Writes OUTDIR/ncu.csv and prints the
# median time per kernel.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUTDIR [bench args]" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NCU=${NCU:-ncu}
ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 ]]; then
  ARGS=(--tokens 4096 --impls jax_ep --ops dispatch,combine --dtypes bf16
        --iters 5 --reps 2 --warmup 1)
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
# shellcheck disable=SC2016  # expanded by the inner shell of each process
timeout 600 "$PYTHON" -m jax_ep.launch -n 2 -- bash -c '
  ncu=$1 out=$2 python=$3; shift 3
  if [[ $JAX_EP_LAUNCH_PROCESS_ID == 0 ]]; then
    exec "$ncu" --metrics gpu__time_duration.sum --csv \
      --kernel-name regex:"Stage|Barrier|Kernel|ReleaseChunks" \
      --log-file "$out/ncu.csv" "$python" -m bench --out "$out/bench.json" "$@"
  fi
  exec "$python" -m bench --out "$out/bench_rank1.json" "$@"
' _ "$NCU" "$OUT" "$PYTHON" "${ARGS[@]}"
"$PYTHON" - "$OUT/ncu.csv" <<'PY'
import collections, csv, statistics, sys
rows = [r for r in csv.DictReader(
    line for line in open(sys.argv[1]) if line.startswith('"'))
    if r.get("Metric Name") == "gpu__time_duration.sum"]
times = collections.defaultdict(list)
for r in rows:
  name = r["Kernel Name"].split("(")[0].split("::")[-1]
  scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0,
           "ms": 1e3, "msecond": 1e3}[r["Metric Unit"]]
  times[name].append(float(r["Metric Value"].replace(",", "")) * scale)
for name, ts in sorted(times.items()):
  print(f"{name:<40} {len(ts):>4} launches, median {statistics.median(ts):9.1f} us")
PY
