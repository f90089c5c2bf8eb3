#!/usr/bin/env bash
# The whole GPU check in one call, for a machine with a GPU and a CUDA torch (e.g. the device tool's H100):
# build (or install a wheel carried from elsewhere), every test (the CUDA ones included), compute-sanitizer
# (memcheck, racecheck, initcheck, synccheck) on a small forward + backward of every op, then the benchmark.
#
#   bash tools/gpu_check.sh                 # build from this checkout against the installed torch
#   WHEEL=.whl/mamba_adaptor_ops-*.whl bash tools/gpu_check.sh   # test a wheel built on another machine
#   STEPS="install tests" bash tools/gpu_check.sh                 # a subset of: install tests sanitizer bench
#
# Results (at most 8 files) go to $OUT (default gpu-check-results/): check.log (versions, build, tests, the
# benchmark table), sanitizer.log, bench.json and the benchmark plots. Exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-results}"
mkdir -p "$OUT"
LOG="$OUT/check.log"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-install tests sanitizer bench}"
status=0
wants() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo -e "\n===== $* ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; return "$rc"; }

step "machine"
run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

export MAMBA_ADAPTOR_CUDA=ON MAMBA_ADAPTOR_REQUIRE_CUDA_KERNELS=1
export MAMBA_ADAPTOR_CUDA_ARCHS="${MAMBA_ADAPTOR_CUDA_ARCHS:-90-real}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
if wants install; then
  if [ -n "${WHEEL:-}" ]; then
    step "install $WHEEL"
    run "$PYTHON" -m pip install --no-deps --force-reinstall $WHEEL || exit 1
  else
    step "build and install"
    start=$(date +%s)
    run "$PYTHON" -m pip install --no-build-isolation --no-deps --force-reinstall . || exit 1
    echo "build + install: $(( $(date +%s) - start )) s" | tee -a "$LOG"
  fi
fi
run "$PYTHON" -c "import mamba_adaptor_ops as m, torch; assert m.CUDA_KERNELS_LOADED; print('CUDA kernels loaded; CUDA dispatch:', {op: torch._C._dispatch_has_kernel_for_dispatch_key(f'mamba_adaptor::{op}', 'CUDA') for op in ('selective_scan', 'state_gather', 'multi_dilation_dwconv2d')})"

if wants tests; then
  step "tests"
  # The CPU emulation of the CUDA kernels (tests/test_cuda_emulated.py) runs in CI; here the GPU runs them.
  run "$PYTHON" -m pytest -q -x -p no:cacheprovider --durations=15 --ignore=tests/test_cuda_emulated.py
fi

if wants sanitizer; then
  step "compute-sanitizer"
  for tool in memcheck racecheck initcheck synccheck; do
    echo "--- $tool" >> "$OUT/sanitizer.log"
    compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PYTHON" tools/sanitizer_smoke.py >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    echo "$tool: exit $rc, $(grep -c -E '^========= (Invalid|Error|Race|Warning)' "$OUT/sanitizer.log") findings so far" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
  done
fi

if wants bench; then
  step "benchmark"
  run mamba-adaptor-bench --out "$OUT" --json "$OUT/bench.json" ${BENCH_ARGS:-}
fi

step "done: status $status"
exit "$status"
