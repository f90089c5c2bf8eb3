"""Timing, memory and bandwidth measurement for the benchmark, on CUDA (events) or on the CPU (wall clock)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    peak_mem_mb: float | None  # extra memory the call allocates at its peak (CUDA only)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def measure(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, budget_s: float
) -> Timing:
    """Median and 20th/80th percentiles of `fn`'s time over up to `repeats` runs after up to `warmup` runs.
    Slow functions get fewer runs, so that one measurement takes about `budget_s`: the warm-up stops once it
    has taken half of it, and the timed runs are as many as fit in it, at least 3 (1 for a function slower
    than the whole budget). The peak memory is that of the first timed run."""
    spent = 0.0
    for _ in range(max(warmup, 1)):
        begin = time.perf_counter()
        fn()
        synchronize(device)
        spent += time.perf_counter() - begin
        if spent > budget_s / 2:
            break
    peak = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    first = _time_once(fn, device)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    fewest = 3 if first < budget_s * 1e3 else 1
    runs = max(fewest, min(repeats, int(budget_s * 1e3 / max(first, 1e-3))))
    times = sorted([first] + [_time_once(fn, device) for _ in range(runs - 1)])
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], len(times), peak)


def copy_bandwidth_gbps(device: torch.device, mbytes: int) -> float:
    """Device-to-device (or RAM-to-RAM) copy bandwidth, counting bytes read and written."""
    src = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=3, repeats=20, budget_s=0.5)
    return 2 * src.numel() / (timing.median_ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict:
    """What a reader needs to compare two reports: device, versions, threads."""
    from .. import CUDA_KERNELS_LOADED, __version__

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mamba_adaptor_ops": __version__,
        "cuda_kernels_loaded": CUDA_KERNELS_LOADED,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info
