"""The Python tools of tools/gpu_check.sh, on the CPU (their GPU runs need a GPU, and ncu): profile_ops.py reading
Nsight Compute's CSV and matching its kernels to the calls made; sanitizer_smoke.py's calls, on the CPU kernels."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_ops", ROOT / "tools" / "profile_ops.py")
profile_ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_ops)

HEADER = '"ID","Process ID","Process Name","Kernel Name","Block Size","Grid Size","Metric Name","Metric Unit","Metric Value"'
SCAN = "void mamba_adaptor::cuda::scan::selective_scan_fwd_kernel<__nv_bfloat16, true>(mamba_adaptor::ScanParams)"
SPIN = "at::cuda::<unnamed>::spin_kernel(long)"


def kernel_rows(kernel_id: int, name: str, ns: float, read: float, write: float) -> list[str]:
    values = {
        "gpu__time_duration.sum": ns,
        "dram__bytes_read.sum": read,
        "dram__bytes_write.sum": write,
        "dram__throughput.avg.pct_of_peak_sustained_elapsed": 80.5,
        "sm__warps_active.avg.pct_of_peak_sustained_active": 60,
        "launch__registers_per_thread": 40,
        "smsp__inst_executed.sum": 3e6,
        "smsp__issue_active.avg.pct_of_peak_sustained_active": 45.5,
        "smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct": 41.2,
        "smsp__warp_issue_stalled_barrier_per_warp_active.pct": 12.0,
        "smsp__warp_issue_stalled_wait_per_warp_active.pct": 7.5,
    }
    return [f'"{kernel_id}","1","python3","{name}","(128, 1, 1)","(9, 1, 1)","{m}","","{v:,}"' for m, v in values.items()]


def write_profile(tmp_path: Path, kernels: list[tuple[str, float, float, float]], n_sections: int):
    lines = ["==PROF== Connected to process 1", HEADER]
    for i, kernel in enumerate(kernels):
        lines += kernel_rows(i, *kernel)
    csv_path = tmp_path / "ncu.csv"
    csv_path.write_text("\n".join(lines) + "\n==PROF== Disconnected\n")
    sections = [
        dict(op="selective_scan", shape="b2-s1", impl="mamba_adaptor_ops", mode=mode, min_bytes=1000)
        for mode in ("fwd", "bwd")[:n_sections]
    ]
    sections_path = tmp_path / "sections.json"
    sections_path.write_text(json.dumps(sections))
    return csv_path, sections_path


def test_kernels_between_markers_are_matched_to_the_calls(tmp_path):
    kernels = [
        (SCAN, 1.0, 1, 1),  # outside any marked call (the warm-up forward): ignored
        (SPIN, 1.0, 0, 0),
        (SCAN, 2000.0, 1500, 500),
        (SPIN, 1.0, 0, 0),
        (SPIN, 1.0, 0, 0),
        (SCAN, 3000.0, 2500, 1500),
        (SCAN, 1000.0, 100, 100),
        (SPIN, 1.0, 0, 0),
    ]
    csv_path, sections_path = write_profile(tmp_path, kernels, 2)
    pairs = profile_ops.split_sections(profile_ops.read_kernels(csv_path), json.loads(sections_path.read_text()))
    assert [section["mode"] for section, _ in pairs] == ["fwd", "bwd"]
    assert [[k["ns"] for k in calls] for _, calls in pairs] == [[2000.0], [3000.0, 1000.0]]
    assert pairs[1][1][0]["read"] == 2500 and pairs[1][1][0]["regs"] == 40

    summary = profile_ops.summarize(csv_path, sections_path).splitlines()
    assert "scan::selective_scan_fwd_kernel" in summary[1]
    # DRAM, occupancy, regs, M inst, issue, then the two largest stall reasons
    assert summary[1].split()[-9:] == ["80.5", "60.0", "40", "3.0", "45.5", "mem", "41", "bar", "12"]
    # fwd: 2000 bytes moved over the 1000 of the count; bwd: 4000 + 200 in 4 us
    assert summary[2].split()[-3:] == ["2.0", "0.0", "2.00"]
    assert summary[-1].split()[-3:] == ["4.0", "0.0", "4.20"]


def test_a_missing_marker_is_an_error(tmp_path):
    csv_path, sections_path = write_profile(tmp_path, [(SPIN, 1.0, 0, 0), (SCAN, 2.0, 1, 1), (SPIN, 1.0, 0, 0)], 2)
    with pytest.raises(SystemExit, match="1 marked calls"):
        profile_ops.summarize(csv_path, sections_path)


def test_sanitizer_smoke_calls_run_on_the_cpu():
    """A dry run of what compute-sanitizer runs: every call is valid (a bad one would waste a GPU session)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sanitizer_smoke.py"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "all ops ran forward and backward" in result.stdout
