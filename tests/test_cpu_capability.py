"""The CPU kernels' vector builds. The rest of the suite runs the widest one this machine has; here the others
(baseline x86-64 and AVX2), picked with MAMBA_ADAPTOR_CPU_CAPABILITY, run each op's reference tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# Every op, every dtype and layout, random shapes, and the 16-bit rounding: a few seconds per build.
SUBSET = "matches_reference or round_like or channels_last_cpu or random or property"


def run_python(args: list[str], capability: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MAMBA_ADAPTOR_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=TESTS)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_vector_build_matches_reference(capability):
    files = ["test_selective_scan.py", "test_state_gather.py", "test_multi_dilation_dwconv2d.py"]
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", SUBSET], capability)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_bad_capability_is_rejected_at_import():
    result = run_python(["-c", "import mamba_adaptor_ops"], "sse9")
    assert result.returncode != 0
    assert 'MAMBA_ADAPTOR_CPU_CAPABILITY: expected "default", "avx2" or "avx512", got "sse9"' in result.stderr
