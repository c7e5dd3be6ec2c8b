#!/usr/bin/env bash
# Short GPU check of the intranode dispatch/combine kernels: build, their GPU
# tests, then the timing script. Usage: scripts/intranode_gpu_check.sh OUTDIR
# (logs: build.log, pytest.log, time.log; summary on stdout).
set -uo pipefail
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
start=$SECONDS
timeout "${BUILD_LIMIT:-240}" "$PYTHON" -m pip install -v --no-build-isolation \
  --no-deps -e . --config-settings=cmake.define.JAX_EP_VERBOSE_PTXAS=ON \
  >"$OUT/build.log" 2>&1
echo "build: exit $? ($((SECONDS - start)) s)"
grep -E "error" "$OUT/build.log" | head -20
start=$SECONDS
timeout "${TEST_LIMIT:-200}" "$PYTHON" -m pytest -x -v -m gpu \
  tests/test_intranode_gpu.py ${PYTEST_ARGS:-} >"$OUT/pytest.log" 2>&1
echo "pytest: exit $? ($((SECONDS - start)) s)"
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest.log" | tail -25
grep -E "Error|assert|differ" "$OUT/pytest.log" | head -30
start=$SECONDS
timeout "${TIME_LIMIT:-100}" "$PYTHON" scripts/time_intranode.py \
  >"$OUT/time.log" 2>&1
echo "timing: exit $? ($((SECONDS - start)) s)"
tail -8 "$OUT/time.log"
