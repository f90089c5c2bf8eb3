"""The CUDA kernels' performance goals (issues 4 and 5) checked against a run's rows: met, or short by how much.

Each goal is a time on an H100 (whose device-to-device copy moves 2.96 TB/s, ../shared/anchors.json), at
the shapes of the op suite with --batch 128. A memory-bound goal asks for a fraction of the copy bandwidth, so
on another GPU it is scaled by the copy bandwidth measured in the same run: on an H200, which copies about 1.4x
faster, it is 1.4x shorter. A compute-bound goal (the d_state-16 scan, bound by its exp2 and shuffles) is kept
as it is: it holds on an H100 or an H200 (the same SMs and clocks), and is only a lead on other GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .report import OURS, Row, aligned

H100_COPY_GBPS = 2960.0
DETERMINISTIC = f"{OURS} deterministic"


@dataclass(frozen=True)
class Goal:
    name: str
    shape: str
    dtype: str
    mode: str
    batch: int
    h100_ms: float  # at most this on an H100
    today: str  # what users run today, on an H100 (anchors.json)
    memory_bound: bool = True


GOALS = [
    Goal("selective_scan", "b2-s1", "bfloat16", "fwd", 128, 0.40, "mamba_ssm 1.11 ms"),
    Goal("selective_scan", "b2-s1", "bfloat16", "bwd", 128, 1.1, "mamba_ssm 2.96 ms"),
    Goal("selective_scan", "b2-s1 N=16", "bfloat16", "fwd", 32, 1.2, "mamba_ssm 1.40 ms", memory_bound=False),
    Goal("selective_scan", "b2-s1 N=16", "bfloat16", "bwd", 32, 4.0, "mamba_ssm 5.02 ms", memory_bound=False),
    # "float32 and stage-3 shapes no slower than mamba_ssm's numbers there"
    Goal("selective_scan", "b2-s1", "float32", "fwd", 128, 1.20, "mamba_ssm 1.20 ms"),
    Goal("selective_scan", "b2-s1", "float32", "bwd", 128, 3.05, "mamba_ssm 3.05 ms"),
    Goal("selective_scan", "b2-s3", "bfloat16", "fwd", 128, 0.33, "mamba_ssm 0.33 ms"),
    Goal("selective_scan", "b2-s3", "bfloat16", "bwd", 128, 0.99, "mamba_ssm 0.99 ms"),
    Goal("multi_dilation_dwconv2d", "b2-s1 NCHW", "bfloat16", "fwd", 128, 0.11, "cuDNN 0.90 ms"),
    Goal("multi_dilation_dwconv2d", "b2-s1 NCHW", "bfloat16", "fwd+bwd", 128, 0.45, "cuDNN 3.55 ms"),
    Goal("multi_dilation_dwconv2d", "b2-s1 NHWC", "bfloat16", "fwd", 128, 0.11, "cuDNN 1.74 ms"),
    Goal("multi_dilation_dwconv2d", "b2-s1 NHWC", "bfloat16", "fwd+bwd", 128, 0.45, "cuDNN 4.49 ms"),
    Goal("state_gather", "b2-s1", "bfloat16", "fwd", 128, 0.30, "PyTorch 11.1 ms"),
    Goal("state_gather", "b2-s1", "bfloat16", "fwd+bwd", 128, 1.2, "PyTorch 40 ms"),
]
GATHER = ("state_gather", "b2-s1", "bfloat16", 128)  # the case of the gather's memory and determinism goals
DETERMINISTIC_BWD_MAX_RATIO = 2.0  # the deterministic backward within 2x of the fast one


@dataclass
class Result:
    goal: str  # what is checked, e.g. "selective_scan b2-s1 bfloat16 fwd"
    target: float | None  # the goal on this device (ms, a ratio or MB, see unit); None: unknown (not run)
    unit: str
    measured: float | None  # None: the run has no such row
    today: str = ""
    h100_ms: float | None = None

    @property
    def verdict(self) -> str:
        if self.measured is None or self.target is None:
            return "not run"
        if self.measured <= self.target:
            return "met"
        return f"short: {self.measured / self.target:.2f}x the goal"


def _find(rows: list[Row], name: str, shape: str, dtype: str, mode: str, batch: int, impl: str = OURS) -> Row | None:
    for row in rows:
        if (row.suite, row.name, row.shape, row.dtype, row.mode, row.impl) == ("ops", name, shape, dtype, mode, impl):
            if row.info.get("batch") == batch and row.median_ms:
                return row
    return None


def check_goals(rows: list[Row], copy_gbps: float) -> list[Result]:
    """Each goal against this run's rows of our CUDA kernels (copy_gbps: this device's measured copy bandwidth)."""
    results = []
    for g in GOALS:
        row = _find(rows, g.name, g.shape, g.dtype, g.mode, g.batch)
        target = g.h100_ms * H100_COPY_GBPS / copy_gbps if g.memory_bound else g.h100_ms
        results.append(Result(f"{g.name} {g.shape} {g.dtype} {g.mode}", target, "ms",
                              row.median_ms if row else None, g.today, g.h100_ms))

    name, shape, dtype, batch = GATHER
    fast, deterministic = (_find(rows, name, shape, dtype, "bwd", batch, impl) for impl in (OURS, DETERMINISTIC))
    results.append(Result(f"{name} {shape} {dtype} deterministic bwd / bwd", DETERMINISTIC_BWD_MAX_RATIO, "x",
                          deterministic.median_ms / fast.median_ms if fast and deterministic else None))
    # Extra memory of a forward + backward: its peak beyond the tensors it returns (out and grad_h, each the size
    # of h, grad_offsets and grad_weights), at most the size of h.
    both = _find(rows, name, shape, dtype, "fwd+bwd", batch)
    h_mb = both.info["h_bytes"] / 2**20 if both else None
    extra = None
    if both and both.peak_mem_mb is not None:
        extra = both.peak_mem_mb - (2 * both.info["h_bytes"] + 2 * both.info["points_bytes"]) / 2**20
    results.append(Result(f"{name} {shape} {dtype} fwd+bwd extra memory", h_mb, "MB", extra, "PyTorch 8 GB peak"))
    return results


def format_goals(results: list[Result], copy_gbps: float) -> str:
    title = (f"Goals (issues 4, 5): H100 times, memory-bound ones here x {H100_COPY_GBPS:.0f} / {copy_gbps:.0f} GB/s "
             "(the H100's copy bandwidth / this device's)")

    def cell(value: float | None, unit: str, spec: str = ".3g") -> str:
        return "-" if value is None else f"{value:{spec}} {unit}"

    table = [["goal", "H100 goal", "goal here", "measured", "verdict", "today (H100)"]] + [
        [r.goal, cell(r.h100_ms, "ms", "g"), cell(r.target, r.unit), cell(r.measured, r.unit), r.verdict, r.today or "-"]
        for r in results
    ]
    return title + "\n" + aligned(table)


def as_json(results: list[Result]) -> list[dict]:
    return [{**asdict(r), "verdict": r.verdict} for r in results]
