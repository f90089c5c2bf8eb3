#!/usr/bin/env bash
# The one-wheel promise, checked without a GPU: one wheel, built once, is installed into a fresh virtual
# environment per (Python, torch release) and the whole test suite (the CUDA emulator's included) runs there.
#
#   bash tools/torch_matrix.sh                       # python3.12 x torch 2.10.0 2.11.0 2.14.1
#   PYTHONS="/usr/bin/python3.11 python3.12" TORCHES="2.11.0" WHEEL=.whl/mamba_adaptor_ops-*.whl \
#     bash tools/torch_matrix.sh
#
# Without WHEEL the wheel is built here against the current environment's torch (with the CUDA kernels for
# sm_90 when nvcc is found). The environments live in build/torch-matrix/ and are reused. PyPI's torch for
# these releases is a CUDA build (gigabytes with its nvidia packages): run this where the package index is
# near, not in CI. Prints one line per environment and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHONS="${PYTHONS:-python3.12}"
TORCHES="${TORCHES:-2.10.0 2.11.0 2.14.1}"
MATRIX=build/torch-matrix
mkdir -p "$MATRIX"

if [ -z "${WHEEL:-}" ]; then
  rm -rf "$MATRIX/wheel"
  MAMBA_ADAPTOR_CUDA_ARCHS="${MAMBA_ADAPTOR_CUDA_ARCHS:-90-real}" \
    python3 -m pip wheel --quiet --no-build-isolation --no-deps . -w "$MATRIX/wheel" || exit 1
  WHEEL=$(ls "$MATRIX"/wheel/*.whl)
fi
WHEEL=$(echo $WHEEL)  # a pattern as in the usage above: the one file it names
[ -f "$WHEEL" ] || { echo "WHEEL must name one wheel file, got: $WHEEL"; exit 1; }
echo "wheel: $WHEEL"
# The oldest glibc and libstdc++ the wheel can load with: the newest symbol versions its modules import (set by
# the glibc and gcc of the machine that built it, and by the static CUDA runtime).
unpacked=$(mktemp -d)
python3 -m zipfile -e "$WHEEL" "$unpacked"
for module in "$unpacked"/mamba_adaptor_ops/*.so; do
  needs=$(objdump -T "$module" | grep -oE "GLIBC_[0-9.]+|GLIBCXX_[0-9.]+" | sort -u -V |
    awk -F_ '{newest[$1] = $0} END {print newest["GLIBC"], newest["GLIBCXX"]}')
  echo "$(basename "$module") needs $needs"
done
rm -rf "$unpacked"

status=0
for python in $PYTHONS; do
  for torch in $TORCHES; do
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || { status=1; continue; }
    env="$MATRIX/py$version-torch$torch"
    log="$env.log"
    {
      [ -x "$env/bin/python" ] || "$python" -m venv "$env"
      "$env/bin/python" -m pip uninstall --quiet --yes mamba-adaptor-ops  # a reused environment's
      "$env/bin/python" -m pip install --quiet "torch==$torch" "$WHEEL[test]" &&
        "$env/bin/python" -m pytest -q -p no:cacheprovider
    } > "$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    installed=$("$env/bin/python" -c 'import torch; print(torch.__version__)' 2> /dev/null)
    summary=$(grep -E '^[0-9]+ (passed|failed)' "$log" | tail -1)
    echo "python $version, torch $installed: exit $rc, $summary ($log)"
  done
done
exit "$status"
