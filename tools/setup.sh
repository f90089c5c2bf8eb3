#!/usr/bin/env bash
# Installs mamba-adaptor-ops from this checkout into the current Python environment, with what the build
# needs. Usage: bash tools/setup.sh [EXTRAS]   e.g. "test", "bench" or "test,bench" (pip extras).
#
# torch: an installed torch >= 2.10 is kept (a CUDA build on a GPU machine, say). Without one, torch 2.13.0
# is installed. The build compiles against the installed torch (--no-build-isolation): an isolated build
# would download a second, different torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras="${1:-}"

if ! "$PYTHON" -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); sys.exit(0 if (int(v[0]), int(v[1])) >= (2, 10) else 1)" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet "scikit-build-core>=0.10" "cmake>=3.26" "ninja>=1.10"
"$PYTHON" -m pip install --quiet --no-build-isolation ".${extras:+[$extras]}"
"$PYTHON" -c "import mamba_adaptor_ops as m, torch; print(f'mamba_adaptor_ops {m.__version__} on torch {torch.__version__}: CUDA kernels built={m.CUDA_KERNELS_BUILT} loaded={m.CUDA_KERNELS_LOADED}')"
