"""What each CUDA kernel costs in memory traffic, for Nsight Compute (tools/gpu_check.sh's profile step).

Run under ncu, it calls this library's forward and backward of every op once on the issues' goal shapes (b2
stage 1, and the scan on stage 3, bfloat16, the benchmark's cases) and writes which calls it made to a sections
file; each call sits between two launches of torch's spin kernel (`torch.cuda._sleep`), which mark where it
starts and ends in ncu's list of kernels. `--summarize` then reads ncu's CSV and prints, per call, each kernel's
time, the bytes it moved through DRAM, their ratio to the fewest bytes the call must move (inputs read once,
outputs written once: the benchmark's count), its fraction of peak DRAM throughput, achieved occupancy,
registers, the warp instructions it executed, how busy the schedulers were issuing them, and the two reasons its
warps most often waited for (share of the active warps' cycles). A ratio well above 1 means re-reads or
uncoalesced access; a low DRAM fraction with a ratio near 1 means too little work in flight, or, with the issue
fraction high, too many instructions per byte. The stall reasons say which: `mem` (a global load's data: too few
loads in flight), `bar` (a block barrier), `smem` (shared memory or the special-function unit), `wait`
(fixed-latency dependencies), `mio`/`lg` (the shared-/global-memory instruction queues full), `math` (an
arithmetic pipe busy).

    ncu --csv --log-file ncu.csv --print-units base --metrics "$(python tools/profile_ops.py --metrics)" \\
        --kernel-name-base demangled -k regex:'mamba_adaptor|spin_kernel' \\
        python tools/profile_ops.py --sections sections.json
    python tools/profile_ops.py --summarize ncu.csv --sections sections.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

METRICS = {
    "gpu__time_duration.sum": "ns",
    "dram__bytes_read.sum": "read",
    "dram__bytes_write.sum": "write",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy%",
    "launch__registers_per_thread": "regs",
    "smsp__inst_executed.sum": "instructions",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue%",
}
# Why warps did not issue: smsp__warp_issue_stalled_<reason>_per_warp_active.pct, by short name.
STALLS = {
    "long_scoreboard": "mem",
    "barrier": "bar",
    "short_scoreboard": "smem",
    "wait": "wait",
    "mio_throttle": "mio",
    "lg_throttle": "lg",
    "math_pipe_throttle": "math",
}
METRICS.update({f"smsp__warp_issue_stalled_{reason}_per_warp_active.pct": name for reason, name in STALLS.items()})
MARKER = "spin_kernel"  # at::cuda::sleep's kernel


def run_calls(sections_path: Path) -> None:
    """Each op's forward and backward once, between markers; the sections file lists them in order."""
    import torch

    from mamba_adaptor_ops.bench.ops import OPS, stage_cases
    from mamba_adaptor_ops.bench.report import OURS

    def marked(call) -> None:
        torch.cuda.synchronize()
        torch.cuda._sleep(1)
        call()
        torch.cuda._sleep(1)
        torch.cuda.synchronize()

    @torch.no_grad()
    def profile(case, impl) -> list[dict]:
        x = case.make_inputs()
        grad = torch.randn_like(impl.forward(x))  # also the warm-up (its kernels lie outside the markers)
        backward = impl.prepare_backward(x)
        marked(lambda: impl.forward(x))
        marked(lambda: backward(grad))
        common = dict(op=case.op, shape=case.shape, impl=impl.name)
        calls = [dict(common, mode="fwd", min_bytes=case.bytes_fwd), dict(common, mode="bwd", min_bytes=case.bytes_bwd)]
        if case.op == "selective_scan" and impl.name == OURS:  # the backward without the forward's checkpoints
            marked(lambda: torch.ops.mamba_adaptor.selective_scan_backward(grad, *x.values(), True, False))
            calls.append(dict(common, mode="bwd, own first pass", min_bytes=case.bytes_bwd))
        return calls

    sections = []
    cases = stage_cases(list(OPS), ["b2-s1"], 128, [torch.bfloat16], "cuda")
    cases += stage_cases(["selective_scan"], ["b2-s3"], 128, [torch.bfloat16], "cuda")  # the short-row kernels
    for case in cases:
        for impl in case.impls:
            if impl.name.startswith(OURS):
                sections += profile(case, impl)
    sections_path.write_text(json.dumps(sections, indent=1))
    print(f"profile_ops: {len(sections)} calls made")


def read_kernels(csv_path: Path) -> list[dict]:
    """ncu's CSV (one row per kernel and metric; other lines skipped) as one dict per kernel, in launch order."""
    lines = [line for line in csv_path.read_text().splitlines() if line.startswith('"')]
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(lines):
        kernel = kernels.setdefault(row["ID"], {"name": row["Kernel Name"]})
        if row["Metric Name"] in METRICS:
            try:
                value = float(row["Metric Value"].replace(",", ""))
            except ValueError:
                value = math.nan
            kernel[METRICS[row["Metric Name"]]] = value
    return [kernels[key] for key in sorted(kernels, key=int)]


def split_sections(kernels: list[dict], sections: list[dict]) -> list[tuple[dict, list[dict]]]:
    """The kernels between each pair of markers, matched in order with the calls of the sections file."""
    calls, current = [], None
    for kernel in kernels:
        if MARKER in kernel["name"]:
            if current is None:
                current = []
            else:
                calls.append(current)
                current = None
        elif current is not None:
            current.append(kernel)
    if len(calls) != len(sections):
        raise SystemExit(f"profile_ops: {len(calls)} marked calls in ncu's output, {len(sections)} in the sections file")
    return list(zip(sections, calls))


def short_name(name: str) -> str:
    """`void mamba_adaptor::cuda::scan::selective_scan_fwd_kernel<...>(...)` -> `scan::selective_scan_fwd_kernel`"""
    name = name.split("(")[0].split("<")[0].removeprefix("void ").strip()
    return name.removeprefix("mamba_adaptor::cuda::")


def top_stalls(kernel: dict, count: int = 2) -> str:
    """The `count` largest stall reasons of a kernel, as `mem 41 bar 12` (percent of active warp cycles)."""
    stalls = sorted(((kernel[name], name) for name in STALLS.values() if name in kernel), reverse=True)
    return " ".join(f"{name} {value:.0f}" for value, name in stalls[:count])


def summarize(csv_path: Path, sections_path: Path) -> str:
    sections = json.loads(sections_path.read_text())
    lines = [
        f"{'call':58} {'kernel':40} {'us':>8} {'DRAM MB':>8} {'x min':>6} {'DRAM %':>6} {'occ %':>5} {'regs':>4} "
        f"{'M inst':>7} {'issue %':>7}  stalls %"
    ]
    for section, kernels in split_sections(read_kernels(csv_path), sections):
        label = f"{section['op']} {section['shape']} {section['mode']} ({section['impl']})"
        total_bytes = sum(k.get("read", 0) + k.get("write", 0) for k in kernels)
        total_us = sum(k.get("ns", 0) for k in kernels) / 1e3
        for k in kernels:
            moved = k.get("read", math.nan) + k.get("write", math.nan)
            lines.append(
                f"{label:58} {short_name(k['name'])[:40]:40} {k.get('ns', math.nan) / 1e3:8.1f} {moved / 1e6:8.1f} "
                f"{moved / section['min_bytes']:6.2f} {k.get('dram%', math.nan):6.1f} "
                f"{k.get('occupancy%', math.nan):5.1f} {k.get('regs', math.nan):4.0f} "
                f"{k.get('instructions', math.nan) / 1e6:7.1f} {k.get('issue%', math.nan):7.1f}  {top_stalls(k)}"
            )
            label = ""
        lines.append(
            f"{'':58} {'total':40} {total_us:8.1f} {total_bytes / 1e6:8.1f} {total_bytes / section['min_bytes']:6.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=Path, default=Path("profile_sections.json"), help="the calls made")
    parser.add_argument("--summarize", type=Path, metavar="NCU_CSV", help="summarize this ncu CSV instead")
    parser.add_argument("--metrics", action="store_true", help="print the metrics ncu must collect")
    args = parser.parse_args()
    if args.metrics:
        print(",".join(METRICS))
    elif args.summarize:
        print(summarize(args.summarize, args.sections))
    else:
        run_calls(args.sections)


if __name__ == "__main__":
    main()
