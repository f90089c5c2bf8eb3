"""Benchmark results: one Row per measurement, the terminal table, the JSON file and the plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "mamba-adaptor-bench/1"
OURS = "mamba_adaptor_ops"  # the name of this library's rows; variants ("... compiled") start with it


@dataclass
class Row:
    suite: str  # "ops", "length" (op time against sequence length) or "models"
    name: str  # op or model
    shape: str
    dtype: str
    mode: str  # ops: "fwd", "bwd", "fwd+bwd"; models: "infer", "train"
    impl: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    repeats: int = 0
    peak_mem_mb: float | None = None
    bytes: int | None = None  # the least a kernel must read and write
    gbps: float | None = None  # bytes / median time
    floor_fraction: float | None = None  # (bytes / measured copy bandwidth) / median time
    images_per_s: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # baseline impl -> its time / this row's time
    info: dict = field(default_factory=dict)
    error: str | None = None


def is_ours(impl: str) -> bool:
    return impl.startswith(OURS)


def add_speedups(rows: list[Row]) -> None:
    """For each of our rows, the ratio of every baseline's time measured for the same case to ours."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.suite, row.name, row.shape, row.dtype, row.mode), []).append(row)
    for group in groups.values():
        baselines = [r for r in group if not is_ours(r.impl) and r.median_ms]
        for row in group:
            if is_ours(row.impl) and row.median_ms:
                row.speedup = {b.impl: b.median_ms / row.median_ms for b in baselines}


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """A plain-text table, one line per row, grouped by suite and name."""
    header = ["suite", "name", "shape", "dtype", "mode", "impl", "median ms", "p20-p80 ms", "speedup", "GB/s",
              "floor", "peak MB", "img/s"]
    lines = [header]
    for r in rows:
        spread = "-" if r.p20_ms is None else f"{r.p20_ms:.3g}-{r.p80_ms:.3g}"
        speedup = ", ".join(f"{v:.1f}x vs {k}" for k, v in r.speedup.items()) or "-"
        lines.append([
            r.suite, r.name, r.shape, r.dtype, r.mode, r.impl,
            _fmt(r.median_ms, ".4g", "error: " + (r.error or "")[:60]) if r.error else _fmt(r.median_ms, ".4g"),
            spread, speedup, _fmt(r.gbps, ".1f"), _fmt(None if r.floor_fraction is None else 100 * r.floor_fraction,
                                                       ".0f") + ("%" if r.floor_fraction is not None else ""),
            _fmt(r.peak_mem_mb, ".0f"), _fmt(r.images_per_s, ".1f"),
        ])
    return aligned(lines)


def aligned(lines: list[list[str]]) -> str:
    """Cells in left-aligned columns, the first line a header underlined with dashes."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path, meta: dict, rows: list[Row], goals: list[dict]) -> None:
    """The report: meta (device, versions), rows, and goals (bench/goals.py's results; empty off CUDA)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"schema": SCHEMA, "meta": meta, "rows": [asdict(r) for r in rows], "goals": goals}
    path.write_text(json.dumps(report, indent=1))


def read_report(path: Path) -> tuple[dict, list[Row]]:
    """The meta and rows of a JSON report (write_json's); ValueError if it is not one."""
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        schema = report.get("schema") if isinstance(report, dict) else None
        raise ValueError(f"expected a report with schema {SCHEMA!r}, got {schema!r}")
    return report["meta"], [Row(**row) for row in report["rows"]]


def format_comparison(rows: list[Row], meta: dict, earlier: list[Row], earlier_meta: dict) -> str:
    """Our rows (of a run on `meta`'s device) next to the same cases of an earlier report: the median times, and
    each speedup over a baseline then and now. A speedup is a ratio to a baseline timed in its own run, so it
    compares across machines and clocks where times do not."""

    def key(row: Row) -> tuple:  # the case: its info holds the batch, sizes, compiled or not
        return row.suite, row.name, row.shape, row.dtype, row.mode, row.impl, tuple(sorted(row.info.items()))

    before = {key(r): r for r in earlier if is_ours(r.impl) and r.median_ms}
    lines = [["suite", "name", "shape", "dtype", "mode", "impl", "ms then", "ms now", "then / now",
              "speedup then -> now"]]
    for r in rows:
        old = before.get(key(r))  # None for a baseline's row: `before` holds ours only, and the key has the impl
        if old is None or not r.median_ms:
            continue
        speedups = [f"{old.speedup[b]:.2f}x -> {v:.2f}x vs {b}" for b, v in r.speedup.items() if b in old.speedup]
        lines.append([r.suite, r.name, r.shape, r.dtype, r.mode, r.impl, f"{old.median_ms:.4g}", f"{r.median_ms:.4g}",
                      f"{old.median_ms / r.median_ms:.2f}x", ", ".join(speedups) or "-"])
    then = (f"{earlier_meta.get('device_name', '?')}, {earlier_meta.get('date', '?')}, torch {earlier_meta.get('torch', '?')}, "
            f"mamba_adaptor_ops {earlier_meta.get('mamba_adaptor_ops', '?')}")
    if len(lines) == 1:
        return f"Compared with {then}: no case in common"
    if earlier_meta.get("device_name") != meta.get("device_name"):
        then += f" (not this {meta.get('device_name', '?')}: compare the speedups, not the times)"
    return f"Compared with {then}:\n" + aligned(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _grouped_bars(ax, labels: list[str], series: dict[str, list[float]], value_fmt: str | None = None) -> None:
    """One group of bars per label, one bar per series, the series in the legend."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        if value_fmt:
            ax.bar_label(bars, fmt=value_fmt, fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.legend(fontsize=8)


def plot_length_sweep(path: Path, rows: list[Row], copy_gbps: float, title: str) -> None:
    """Forward time against sequence length per op, every implementation, with the memory-bandwidth floor."""
    sweep = [r for r in rows if r.suite == "length" and r.median_ms]
    ops = list(dict.fromkeys(r.name for r in sweep))
    if not ops:
        return
    fig, axes = _pyplot().subplots(1, len(ops), figsize=(5.2 * len(ops), 4.2), squeeze=False)
    for ax, op in zip(axes[0], ops):
        op_rows = [r for r in sweep if r.name == op]
        for impl in dict.fromkeys(r.impl for r in op_rows):
            pts = sorted((r.info["L"], r.median_ms) for r in op_rows if r.impl == impl)
            ax.plot(*zip(*pts), marker="o", label=impl, linewidth=2.2 if is_ours(impl) else 1.4)
        floor = sorted({(r.info["L"], r.bytes / (copy_gbps * 1e9) * 1e3) for r in op_rows if r.bytes})
        if floor:
            ax.plot(*zip(*floor), "k--", linewidth=1, label=f"bandwidth floor ({copy_gbps:.0f} GB/s copy)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        lengths = sorted({r.info["L"] for r in op_rows})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length L = H x W")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_speedups(path: Path, rows: list[Row], title: str) -> None:
    """Our speedup over each baseline on the paper's stage shapes: a panel per op (rows) and dtype (columns), a
    horizontal bar per case (shape, mode) and baseline, so that a full GPU run's hundred cases stay readable."""
    ours = [r for r in rows if r.suite == "ops" and r.impl == OURS and r.speedup]
    if not ours:
        return
    from matplotlib import ticker

    ops = list(dict.fromkeys(r.name for r in ours))
    dtypes = list(dict.fromkeys(r.dtype for r in ours))
    colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(b for r in ours for b in r.speedup))}
    panels = {(op, dt): [r for r in ours if r.name == op and r.dtype == dt] for op in ops for dt in dtypes}
    cases = [max(len(panels[op, dt]) for dt in dtypes) for op in ops]
    size = (4.6 * len(dtypes) + 1.0, 0.24 * sum(cases) + 1.1 * len(ops) + 0.8)  # inches: 0.24 per bar row
    fig, axes = _pyplot().subplots(
        len(ops), len(dtypes), squeeze=False, figsize=size, gridspec_kw={"height_ratios": [n + 2 for n in cases]}
    )
    for (i, op), (j, dt) in ((row, col) for row in enumerate(ops) for col in enumerate(dtypes)):
        ax, panel = axes[i][j], panels[op, dt]
        baselines = list(dict.fromkeys(b for r in panel for b in r.speedup))
        width = 0.8 / max(1, len(baselines))
        for k, baseline in enumerate(baselines):
            ys = [y + (k - (len(baselines) - 1) / 2) * width for y in range(len(panel))]
            values = [r.speedup.get(baseline, math.nan) for r in panel]
            ax.barh(ys, values, height=width, color=colors[baseline], label=f"vs {baseline}")
        ax.set_yticks(range(len(panel)), [f"{r.shape} {r.mode}" for r in panel], fontsize=7)
        ax.set_ylim(max(len(panel), cases[i]) - 0.5, -0.5)  # first case on top
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.set_title(f"{op}, {dt}", fontsize=9)
        if baselines:
            ax.legend(fontsize=7, loc="lower right")
        if i == len(ops) - 1:
            ax.set_xlabel("speedup: baseline time / our time (log scale)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_model_throughput(path: Path, rows: list[Row], title: str) -> None:
    """Images/s of each model and implementation, inference and training side by side."""
    model_rows = [r for r in rows if r.suite == "models" and r.images_per_s]
    if not model_rows:
        return
    labels = list(dict.fromkeys(f"{r.name}\n{r.impl}" for r in model_rows))
    series = {}
    for mode in dict.fromkeys(r.mode for r in model_rows):
        values = {f"{r.name}\n{r.impl}": r.images_per_s for r in model_rows if r.mode == mode}
        series[mode] = [values.get(label, 0.0) for label in labels]
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.6))
    _grouped_bars(ax, labels, series, value_fmt="%.0f")
    ax.set_ylabel(f"images / s ({model_rows[0].shape}, {model_rows[0].dtype})")
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
