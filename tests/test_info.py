"""`python -m mamba_adaptor_ops`: the install's report and self-test (mamba_adaptor_ops/info.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mamba_adaptor_ops import info


def test_report_runs_the_self_test_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "mamba_adaptor_ops"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "self-test cpu   ok" in proc.stdout
    assert "built with      torch " in proc.stdout


def test_json_report_says_how_this_install_was_built():
    proc = subprocess.run([sys.executable, "-m", "mamba_adaptor_ops", "--json"], capture_output=True, text=True)
    report = json.loads(proc.stdout)
    assert set(report) >= {"mamba_adaptor_ops", "build", "python", "torch", "cuda_kernels", "gpus", "self_test"}
    # Written by the build (CMakeLists.txt): an installed package has it.
    assert report["build"]["torch_version"] and report["build"]["torch_target"] == "2.10"
    assert bool(report["build"]["cuda_compiler"]) == report["cuda_kernels"]["built"]
    ops, dtypes = ("selective_scan", "state_gather", "multi_dilation_dwconv2d"), ("float32", "bfloat16", "float16")
    assert report["self_test"]["cpu"] == {f"{op} {dtype}": "ok" for dtype in dtypes for op in ops}


@pytest.mark.parametrize(
    "archs, gpu, covered",
    [
        ("80-real;90-real;90-virtual", (8, 0), "sm_80"),
        ("80-real;90-real;90-virtual", (8, 9), "sm_80"),  # a cubin runs on later minor versions of its major
        ("80-real;90-real;90-virtual", (9, 0), "sm_90"),
        ("80-real;90-real;90-virtual", (12, 0), "compute_90 (PTX)"),  # PTX on every later architecture
        ("80-real;90-real;90-virtual", (7, 5), None),
        ("90-real", (10, 0), None),
        ("80", (9, 0), "compute_80 (PTX)"),  # a plain number is both
    ],
)
def test_arch_covered(archs, gpu, covered):
    assert info.arch_covered(archs, *gpu) == covered


def test_a_crashing_self_test_is_reported_not_fatal():
    result, failure = info.run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert result is None and failure.startswith("crashed (killed by signal 11)")
    report = {
        "mamba_adaptor_ops": {"version": "0", "path": "."}, "python": "", "platform": "",
        "build": {"torch_version": "", "torch_target": "", "cxx_compiler": "", "cuda_compiler": "", "cuda_archs": ""},
        "torch": {"version": "", "cuda": ""}, "cuda_kernels": {"built": False, "loaded": False, "error": ""},
        "gpus": [], "self_test": {"cpu": {"selective_scan": "ok"}, "cuda:0": {"process": failure}},
    }
    text = info.format_report(report)
    assert "self-test cuda:0 FAILED" in text and "process: crashed (killed by signal 11)" in text
    assert not info.passed(report)


def test_self_test_catches_a_wrong_result(monkeypatch):
    monkeypatch.setattr(info.reference, "state_gather", lambda h, offsets, weights: 2 * h + 0 * (offsets.sum() + weights.sum()))
    results = info.self_test("cpu")
    failed = {name for name, result in results.items() if result != "ok"}
    assert failed == {"state_gather float32", "state_gather bfloat16", "state_gather float16"}
    assert results["state_gather float32"].startswith("AssertionError")
