#!/usr/bin/env bash
# The whole GPU check in one call, for a machine with a GPU and a CUDA torch (e.g. the device tool's H100):
# build (or install a wheel carried from elsewhere), every test (the CUDA ones included), compute-sanitizer
# (memcheck, racecheck, initcheck, synccheck) on a small forward + backward of every op, the benchmark,
# Nsight Compute's DRAM bytes, occupancy and registers of every kernel on the goal shapes, and, when a wheel is
# tested, a source build of this checkout with the machine's own compilers.
#
#   bash tools/gpu_check.sh                 # build from this checkout against the installed torch
#   WHEEL=dist/mamba_adaptor_ops-*.whl bash tools/gpu_check.sh   # test a wheel built on another machine
#       (the release wheel: tools/manylinux_wheel.sh); if it does not install, load or run a kernel here, the
#       check fails, logs why, and runs its other steps on a build from this checkout, in the same call
#   STEPS="install tests" bash tools/gpu_check.sh   # a subset of: install tests sanitizer bench profile source
#   STEPS="install bench" BENCH_ARGS="--budget 1" BENCH_SECONDS=570 DEADLINE=590 bash tools/gpu_check.sh
#       # the benchmark's default run (every stage and dtype, models with and without torch.compile), 530 s at most
#
# Results (at most 9 files) go to $OUT (default gpu-check-results/): check.log (versions, build, tests, the
# benchmark table, the profile summary), sanitizer.log, bench.json, the benchmark plots, ncu.csv and
# source-build.log. Exits non-zero if a step failed (the profile, a measurement, only reports).
#
# The device tool gives a session 15 minutes of GPU time in all, a machine's start (a minute or two) included,
# and starts no machine with under 4 minutes left: the whole check keeps within DEADLINE seconds (default 420,
# which leaves time for a second call, e.g. STEPS="install tests" after a fix, or "install profile"), each step
# within its own cap and what is left, in the order of what only a GPU can show: the CUDA tests (the two
# torch.compile ones, slow on a bare machine, come later), memcheck and racecheck, the benchmark of the issues'
# goal shapes (BENCH_ARGS), the profile, then the rest of the tests and initcheck/synccheck. A step cut short
# is reported as FAILED (124).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-results}"
mkdir -p "$OUT"
LOG="$OUT/check.log"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-install tests sanitizer bench profile source}"
status=0
wants() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo -e "\n===== $* ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; return "$rc"; }

DEADLINE="${DEADLINE:-420}"
started=$(date +%s)
# budget CAP: the seconds a step may take, at most CAP and what is left of DEADLINE.
budget() { local left=$(( DEADLINE - ($(date +%s) - started) )); echo $(( left < $1 ? (left > 0 ? left : 1) : $1 )); }

step "machine"
run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" ||
  { echo "no GPU that this torch can use: nothing to check here" | tee -a "$LOG"; exit 1; }

export MAMBA_ADAPTOR_CUDA=ON MAMBA_ADAPTOR_REQUIRE_CUDA_KERNELS=1
export MAMBA_ADAPTOR_CUDA_ARCHS="${MAMBA_ADAPTOR_CUDA_ARCHS:-90-real}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
# The installed package (or the one first on PYTHONPATH) loads its CUDA kernels, runs a CPU op, and runs the same
# op on this GPU in agreement; each stage prints a line as it ends, so a crash's place shows in the output.
KERNEL_CHECK="
import mamba_adaptor_ops as m, torch
assert m.CUDA_KERNELS_LOADED
print('CUDA kernels loaded from', m.__file__, '; CUDA dispatch:', {op: torch._C._dispatch_has_kernel_for_dispatch_key(f'mamba_adaptor::{op}', 'CUDA') for op in ('selective_scan', 'state_gather', 'multi_dilation_dwconv2d')}, flush=True)
h, offsets, weights = torch.randn(1, 2, 3, 9), torch.randn(1, 2, 2, 9), torch.rand(1, 2, 2, 9)
expected = m.state_gather(h, offsets, weights)
print('a CPU op ran', flush=True)
torch.testing.assert_close(m.state_gather(h.cuda(), offsets.cuda(), weights.cuda()).cpu(), expected)
print('a kernel ran on', torch.cuda.get_device_name(), 'and agrees with the CPU', flush=True)"
kernels_run() { run "$PYTHON" -c "$KERNEL_CHECK"; }
build_from_source() {
  step "build and install"
  start=$(date +%s)
  run "$PYTHON" -m pip install --no-build-isolation --no-deps --force-reinstall . || exit 1
  echo "build + install: $(( $(date +%s) - start )) s" | tee -a "$LOG"
}
wheel_runs=0
if wants install; then
  if [ -n "${WHEEL:-}" ]; then
    step "install $WHEEL"
    # A carried wheel that does not install or run here fails the check (the one-wheel promise), and the
    # log above says which symbol or check stopped it; the rest of the check runs on a source build.
    if run "$PYTHON" -m pip install --no-deps --force-reinstall $WHEEL && kernels_run; then
      wheel_runs=1
    else
      echo "the wheel $WHEEL does not run here: building from source for the other steps" | tee -a "$LOG"
      build_from_source
    fi
  else
    build_from_source
  fi
fi
[ "$wheel_runs" -eq 1 ] || kernels_run || exit 1
step "the install's report: builds, versions, each GPU's architecture, a self-test per device"
run "$PYTHON" -m mamba_adaptor_ops

# The CPU emulation of the CUDA kernels (tests/test_cuda_emulated.py) runs in CI; here the GPU runs them.
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --maxfail=30 --durations=10 --ignore=tests/test_cuda_emulated.py)
sanitize() {  # sanitize TOOL...
  for tool in "$@"; do
    echo "--- $tool" >> "$OUT/sanitizer.log"
    timeout "$(budget 90)" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PYTHON" tools/sanitizer_smoke.py >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    echo "$tool: exit $rc, $(grep -c -E '^========= (Invalid|Error|Race|Warning)' "$OUT/sanitizer.log") findings so far" | tee -a "$LOG"
    if grep -q -E "Device not supported|LibraryNotLoaded" "$OUT/sanitizer.log"; then
      echo "$tool: compute-sanitizer cannot use this machine's GPU (its runtime): nothing was checked" | tee -a "$LOG"
    fi
    [ "$rc" -eq 0 ] || status=1
  done
}

if wants tests; then
  step "CUDA tests but torch.compile's"
  run timeout "$(budget 150)" "${PYTEST[@]}" -m cuda -k "not compile"
fi
if wants sanitizer; then
  step "compute-sanitizer memcheck, racecheck"
  sanitize memcheck racecheck
fi
if wants bench; then
  step "benchmark"
  # Default: the issues' goal shapes (b2-s1 with d_state 1 and 16, b2-s3) and b1-s1, models without compile.
  # Its own --time-limit, inside the step's, lets it stop starting cases and still write its table and JSON.
  # Compared with the latest GPU run in bench/results/ (bench/README.md's table).
  seconds=$(budget "${BENCH_SECONDS:-200}")
  latest=$(ls bench/results/*.json 2> /dev/null | tail -1)
  run timeout "$seconds" "$PYTHON" -m mamba_adaptor_ops.bench --out "$OUT" --json "$OUT/bench.json" \
    --time-limit $(( seconds > 80 ? seconds - 40 : seconds / 2 )) ${latest:+--compare "$latest"} \
    ${BENCH_ARGS:---stages b1-s1 b2-s1 b2-s3 --no-compile --budget 0.5}
fi
if wants profile; then
  step "Nsight Compute: time, DRAM bytes, occupancy, registers, instructions, stall reasons of each kernel (tools/profile_ops.py)"
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | tail -1)
  if [ -n "$ncu" ]; then
    sections=/tmp/profile_sections.json
    timeout "$(budget 120)" "$ncu" --csv --log-file "$OUT/ncu.csv" --print-units base --clock-control none \
      --metrics "$("$PYTHON" tools/profile_ops.py --metrics)" --kernel-name-base demangled \
      -k regex:'mamba_adaptor|spin_kernel' "$PYTHON" tools/profile_ops.py --sections "$sections" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] && "$PYTHON" tools/profile_ops.py --summarize "$OUT/ncu.csv" --sections "$sections" 2>&1 | tee -a "$LOG"
    [ "$rc" -eq 0 ] || echo "profile: ncu exit $rc (no hardware counters on this runtime?); see ncu.csv" | tee -a "$LOG"
  else
    echo "profile: ncu not found" | tee -a "$LOG"
  fi
fi
if wants tests; then
  step "CUDA torch.compile tests"  # Inductor's first compiles on a bare machine take a while: after the kernels'
  run timeout "$(budget 90)" "${PYTEST[@]}" -m cuda -k compile
  step "CPU tests"
  run timeout "$(budget 120)" "${PYTEST[@]}" -m "not cuda"
fi
if wants sanitizer; then
  step "compute-sanitizer initcheck, synccheck"
  sanitize initcheck synccheck
fi
# With a carried wheel under test: a build from this checkout with this machine's compilers, installed apart
# (in $SOURCE_PREFIX, first on PYTHONPATH) with debug info and the release's optimisation, must run a CPU and a
# CUDA op too. A crash prints its native stack (a preloaded SIGSEGV/SIGBUS/SIGABRT handler), symbolised with
# addr2line, after the compiler, the build's torch and what the modules link against.
if wants source && [ "$wheel_runs" -eq 1 ]; then
  step "source build with this machine's compilers, apart from the tested wheel"
  SOURCE_PREFIX="${SOURCE_PREFIX:-/tmp/mamba-adaptor-source-build}"
  rm -rf "$SOURCE_PREFIX" "$SOURCE_PREFIX.build" && mkdir -p "$SOURCE_PREFIX"
  gcc --version | head -1 | tee -a "$LOG"
  timeout "$(budget 150)" "$PYTHON" -m pip install --no-build-isolation --no-deps --target "$SOURCE_PREFIX" -v \
    --config-settings=cmake.define.CMAKE_CXX_FLAGS=-g --config-settings=install.strip=false \
    --config-settings=build-dir="$SOURCE_PREFIX.build" . \
    > "$OUT/source-build.log" 2>&1
  built=$?
  echo "build: exit $built (log: source-build.log)" | tee -a "$LOG"
  [ "$built" -eq 0 ] || tail -20 "$OUT/source-build.log" | tee -a "$LOG"
  grep -E "The (CXX|CUDA) compiler identification|torch library" "$OUT/source-build.log" | tee -a "$LOG"
  for module in "$SOURCE_PREFIX"/mamba_adaptor_ops/_C*.so; do
    echo "--- $module links" | tee -a "$LOG"
    ldd "$module" | grep -E "torch|c10|stdc\+\+|python|not found" | tee -a "$LOG"
  done
  cat > /tmp/segv_backtrace.c << 'C'
#include <execinfo.h>
#include <signal.h>
static void on_signal(int sig) {
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
  signal(sig, SIG_DFL);
  raise(sig);
}
__attribute__((constructor)) static void install(void) {
  signal(SIGSEGV, on_signal);
  signal(SIGBUS, on_signal);
  signal(SIGABRT, on_signal);
}
C
  gcc -shared -fPIC -o /tmp/segv_backtrace.so /tmp/segv_backtrace.c
  rm -f /tmp/source-run.log
  [ "$built" -eq 0 ] && PYTHONPATH="$SOURCE_PREFIX" LD_PRELOAD=/tmp/segv_backtrace.so timeout "$(budget 60)" \
    "$PYTHON" -c "$KERNEL_CHECK" > /tmp/source-run.log 2>&1
  rc=$?
  [ -f /tmp/source-run.log ] && head -40 /tmp/source-run.log | tee -a "$LOG"
  # Frames of a module without an exported symbol there, "module(+0xoffset) [address]": function, file, line.
  grep -s -o -E "^[^ (]+\(\+0x[0-9a-f]+\)" /tmp/source-run.log | head -24 |
    while IFS='(' read -r module offset; do
      echo "$(basename "$module") ${offset%)}: $(addr2line -f -C -i -p -e "$module" "${offset%)}" 2>&1 | head -3)"
    done | tee -a "$LOG"
  echo "source build run: exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
fi

step "done: status $status"
exit "$status"
