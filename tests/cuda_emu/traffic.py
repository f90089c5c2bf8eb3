"""The CUDA kernels' global memory traffic, counted by the emulator: a forecast, without a GPU, of the bytes each
op moves through DRAM against the fewest it must move (the benchmark's count: inputs read once, outputs written
once).

The emulator's "traffic" build (build.py) counts, per launch, the bytes its threads request from global memory
and the distinct 32-byte sectors (a GPU's unit of DRAM traffic) they read and write; cudaMemsetAsync's writes
count as a launch of their own. A launch that reads each of its sectors from DRAM once and writes each once,
the rest hitting the caches, moves `unique` bytes: the least its access pattern allows, which Nsight Compute's
DRAM bytes (tools/profile_ops.py's "x min") approach on a GPU whose caches hold the reuse. `requested` is what
the caches serve. Ratios to the minimum do not depend on the batch (every op works per batch element but for
small parameter gradients), so a forecast at batch 1 holds at the benchmark's batch 128; `floor ms` is the
time the unique bytes take at the benchmark's GPU batch and a copy bandwidth (default: the H100's 2.96 TB/s,
measured with the peers' timings). torch's own kernels are not counted: the ops' CUDA registrations call none
on contiguous inputs (a contiguous copy of a strided grad_out would be one).

The count also groups each warp's accesses into the requests a GPU issues (a lane's n-th execution of an
instruction) and compares the sectors each touches with the fewest its distinct bytes fit in: `coalesced`, 1.00
for perfectly coalesced requests; `--sites N` names each kernel's N call sites (file:line) with the most sectors
beyond their fewest, and its divergent ones: where lanes of a warp ran an instruction more than once apart (a
branch around it, loops of different lengths), their n-th executions are no longer one request, so those
requests are counted apart (`divergent`) and left out of `coalesced`. The emulator runs the code paths of a build without __CUDA_ARCH__ >= 900: sm_80's, e.g.
four scalar float atomics where sm_90 adds a float4 at once.

    python tests/cuda_emu/traffic.py [--batch 1] [--stages b2-s1 b2-s3] [--ops selective_scan ...] [--sites 2]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mamba_adaptor_ops.bench.ops import DILATIONS, OPS, STAGES, OpCase, stage_cases

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import build  # noqa: E402
from profile_ops import short_name  # noqa: E402

SECTOR = 32  # bytes


@dataclass
class Requests:
    """The warp requests of one call site, or of a whole launch: the sectors touched by those not divergent and
    the fewest their distinct bytes fit in, and the divergent ones (emu.cpp's traffic)."""

    requests: int
    sectors: int
    ideal_sectors: int
    divergent: int
    write: bool = False
    site: str = ""  # file:line (function), for a call site

    @property
    def coalescing(self) -> float:
        """Fewest sectors over sectors touched, of the requests not divergent: 1 for perfectly coalesced ones."""
        return self.ideal_sectors / self.sectors if self.sectors else 1.0

    @property
    def divergent_share(self) -> float:
        return self.divergent / self.requests if self.requests else 0.0


@dataclass
class Launch:
    kernel: str  # e.g. "scan::selective_scan_fwd_kernel", or "cudaMemsetAsync"
    requested_read: int
    requested_written: int
    unique_read: int  # bytes: distinct sectors read x 32
    unique_written: int
    requests: Requests
    sites: list[Requests]

    @property
    def requested(self) -> int:
        return self.requested_read + self.requested_written

    @property
    def unique(self) -> int:
        return self.unique_read + self.unique_written


class TrafficCounter:
    """The traffic build's ops (torch.ops.mamba_adaptor_emu_traffic, on CPU tensors) and its counter."""

    def __init__(self, library: Path | None = None):
        library = library or build.build(variant="traffic")
        torch.ops.load_library(str(library))
        self.ops = getattr(torch.ops, build.namespace("traffic"))
        self.lib = ctypes.CDLL(str(library))
        if not self.lib.mamba_emu_traffic_counted():
            raise RuntimeError(f"{library} is not the emulator's traffic build")
        out = ctypes.POINTER(ctypes.c_uint64)
        self.lib.mamba_emu_traffic_record.argtypes = [ctypes.c_uint64, out, out]  # record, kernel, counts
        self.lib.mamba_emu_traffic_site.argtypes = [ctypes.c_uint64, ctypes.c_uint64, out, out]  # record, site, ...
        self.library = library
        self.kernels = self._kernel_names(library)

    @staticmethod
    def _kernel_names(library: Path) -> dict[int, str]:
        """Function address (relative to the load address) -> short name, from the symbol table (the static
        functions included, which dladdr cannot name)."""
        listing = subprocess.run(
            ["nm", "-C", "--defined-only", str(library)], capture_output=True, text=True, check=True
        )
        names = {}
        for line in listing.stdout.splitlines():
            address, kind, name = (line.split(" ", 2) + ["", ""])[:3]
            if kind in ("t", "T", "w", "W"):
                names[int(address, 16)] = short_name(name)
        return names

    def count(self, call: Callable, *args) -> tuple[object, list[Launch]]:
        """call(*args), and the launches (and memsets) it made, in order, with their traffic."""
        self.lib.mamba_emu_traffic_start()
        try:
            result = call(*args)
        finally:
            self.lib.mamba_emu_traffic_stop()
        launches, kernel, counts = [], ctypes.c_uint64(), (ctypes.c_uint64 * 9)()
        while self.lib.mamba_emu_traffic_record(len(launches), ctypes.byref(kernel), counts):
            name = self.kernels.get(kernel.value, hex(kernel.value)) if kernel.value else "cudaMemsetAsync"
            sites = [self._site(len(launches), j) for j in range(counts[8])]
            launches.append(
                Launch(name, *counts[:2], counts[2] * SECTOR, counts[3] * SECTOR, Requests(*counts[4:8]), sites)
            )
        return result, launches

    def _site(self, launch: int, j: int) -> Requests:
        site, counts = ctypes.c_uint64(), (ctypes.c_uint64 * 5)()
        self.lib.mamba_emu_traffic_site(launch, j, ctypes.byref(site), counts)
        return Requests(*counts[:4], bool(counts[4]), self._source(site.value))

    @functools.cache  # noqa: B019 (one counter per process)
    def _source(self, address: int) -> str:
        """file:line (function) of the instruction before `address` (the instrumentation's return address)."""
        lines = subprocess.run(
            ["addr2line", "-f", "-C", "-s", "-e", str(self.library), hex(address - 1)],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        return f"{lines[1]} ({short_name(lines[0])})" if len(lines) >= 2 else hex(address)

    def op_calls(
        self, case: OpCase, deterministic: bool, inputs: dict[str, torch.Tensor] | None = None
    ) -> tuple[Callable[[], torch.Tensor], Callable]:
        """The case's forward and backward (grad -> grads) on `inputs` (default: the case's), as the benchmark
        calls them: with softplus, with the residual."""
        x = list((inputs or case.make_inputs()).values())
        if case.op == "multi_dilation_dwconv2d":
            forward, backward = self.ops.multi_dilation_dwconv2d, self.ops.multi_dilation_dwconv2d_backward
            return lambda: forward(*x, list(DILATIONS)), lambda grad: backward(grad, *x, list(DILATIONS))
        forward, backward = getattr(self.ops, case.op), getattr(self.ops, case.op + "_backward")
        # selective_scan: delta_softplus; state_gather: residual.
        return lambda: forward(*x, True, deterministic), lambda grad: backward(grad, *x, True, deterministic)


@dataclass
class Forecast:
    case: OpCase
    mode: str  # "fwd" or "bwd"
    deterministic: bool
    launches: list[Launch]
    scale: float = 1.0  # the benchmark's GPU batch of this case over the case's batch

    @property
    def min_bytes(self) -> int:
        return self.case.bytes_fwd if self.mode == "fwd" else self.case.bytes_bwd

    @property
    def label(self) -> str:
        dtype = str(self.case.dtype).removeprefix("torch.")
        return f"{self.case.op} {self.case.shape} {dtype} {self.mode}" + (
            " det" if self.deterministic else ""
        )


def forecast(counter: TrafficCounter, cases: list[OpCase], gpu_cases: list[OpCase]) -> list[Forecast]:
    """Each case's forward and backward (and the deterministic backward where it differs); `gpu_cases`, the same
    cases at the benchmark's GPU batch, give the scale."""
    rows = []
    for case, gpu_case in zip(cases, gpu_cases, strict=True):
        forward, backward = counter.op_calls(case, deterministic=False)
        grad = torch.randn_like(forward())
        scale = gpu_case.batch / case.batch
        rows.append(Forecast(case, "fwd", False, counter.count(forward)[1], scale))
        rows.append(Forecast(case, "bwd", False, counter.count(backward, grad)[1], scale))
        if case.op == "selective_scan":  # the adaptors' backwards are deterministic either way
            _, deterministic_backward = counter.op_calls(case, deterministic=True)
            rows.append(Forecast(case, "bwd", True, counter.count(deterministic_backward, grad)[1], scale))
    return rows


def table(rows: list[Forecast], bandwidth: float, sites: int = 0) -> str:
    """Per call, each launch's unique and requested bytes and their ratios to the minimum, how coalesced its warps'
    requests are (fewest sectors / sectors touched) and the share of them that is divergent, then the total with
    the time its unique bytes take at `bandwidth` (bytes/s), scaled to the benchmark's GPU batch; with `sites`,
    each launch's that many call sites with the most sectors beyond their fewest, and its divergent ones."""
    lines = [
        f"{'call':52} {'kernel':36} {'unique':>7} {'x min':>6} {'requested':>9} {'x min':>6} {'coalesced':>9} "
        f"{'divergent':>9} {'floor ms':>8}"
    ]
    for row in rows:
        label = row.label
        for launch in row.launches:
            lines.append(
                f"{label:52} {launch.kernel[:36]:36} {launch.unique / 1e6:6.2f}M {launch.unique / row.min_bytes:6.3f} "
                f"{launch.requested / 1e6:8.2f}M {launch.requested / row.min_bytes:6.2f} "
                f"{launch.requests.coalescing:9.2f} {launch.requests.divergent_share:9.0%}"
            )
            label = ""
            uncoalesced = [site for site in launch.sites if site.sectors > site.ideal_sectors]
            for site in sorted(uncoalesced, key=lambda site: site.ideal_sectors - site.sectors)[:sites]:
                lines.append(
                    f"{'':52}   {'store' if site.write else 'load'} {site.site}: {site.requests} requests, "
                    f"{site.sectors / (site.requests - site.divergent):.1f} sectors each, fewest "
                    f"{site.ideal_sectors / (site.requests - site.divergent):.1f}"
                )
            for site in [site for site in launch.sites if site.divergent and sites]:
                lines.append(
                    f"{'':52}   {'store' if site.write else 'load'} {site.site}: {site.requests} requests, "
                    f"{site.divergent_share:.0%} divergent"
                )
        unique, requested = sum(x.unique for x in row.launches), sum(x.requested for x in row.launches)
        lines.append(
            f"{'':52} {'total (min ' + format(row.min_bytes / 1e6, '.2f') + 'M)':36} {unique / 1e6:6.2f}M "
            f"{unique / row.min_bytes:6.3f} {requested / 1e6:8.2f}M {requested / row.min_bytes:6.2f} {'':19} "
            f"{unique * row.scale / bandwidth * 1e3:8.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stages", nargs="+", default=["b2-s1", "b2-s3"], choices=list(STAGES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--gpu-batch", type=int, default=128, help="the batch of `floor ms` (the benchmark's)"
    )
    parser.add_argument("--bandwidth", type=float, default=2.96, help="copy bandwidth of `floor ms`, TB/s")
    parser.add_argument("--sites", type=int, default=0, help="list each kernel's N least coalesced call sites")
    args = parser.parse_args()
    dtypes = [getattr(torch, args.dtype)]
    cases = stage_cases(args.ops, args.stages, args.batch, dtypes, "cpu")
    gpu_cases = stage_cases(
        args.ops, args.stages, args.gpu_batch, dtypes, "cpu"
    )  # sizes only: nothing is made
    print(table(forecast(TrafficCounter(), cases, gpu_cases), args.bandwidth * 1e12, args.sites))


if __name__ == "__main__":
    main()
