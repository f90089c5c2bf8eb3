"""`mamba-adaptor-bench`: time the ops (and models) against their baselines, print a table, write JSON and plots.

On a GPU it runs every op on every b1/b2 stage shape in every dtype the device supports; on the CPU it
implies --quick (one stage shape, float32) so that it finishes in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import models as model_suite
from . import ops as op_suite
from .goals import as_json as goals_json
from .goals import check_goals, format_goals
from .report import (
    Row,
    add_speedups,
    format_comparison,
    format_table,
    plot_length_sweep,
    plot_model_throughput,
    plot_speedups,
    read_report,
    write_json,
)
from .timing import Timing, copy_bandwidth_gbps, environment, measure

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mamba-adaptor-bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--suites", nargs="+", choices=["ops", "models"], default=["ops", "models"], help="what to time")
    p.add_argument("--ops", nargs="+", choices=op_suite.OPS, default=list(op_suite.OPS), help="ops to time")
    p.add_argument("--stages", nargs="+", choices=list(op_suite.STAGES), help="stage shapes (default: all; quick: b1-s1)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="dtypes (default: all the device supports; quick: float32)")
    p.add_argument("--batch", type=int, help="batch size of the stage shapes (default 128 on a GPU, 2 on the CPU)")
    p.add_argument("--lengths", type=int, nargs="*", help="map sides of the length sweep (default 14 28 56 [112]); none to skip")
    p.add_argument("--models", nargs="+", choices=model_suite.MODELS, default=list(model_suite.MODELS),
                   help="models of the model suite")
    p.add_argument("--resolution", type=int, help="model input side (default 224 on a GPU, 64 on the CPU)")
    p.add_argument("--model-batch", type=int, help="model suite batch (default 64 on a GPU, 2 on the CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="also time torch.compile'd models (default: on a GPU, not on the CPU)")
    p.add_argument("--quick", action="store_true", help="one stage shape, float32, few repeats (implied on the CPU)")
    p.add_argument("--full", action="store_true", help="no --quick on the CPU")
    p.add_argument("--warmup", type=int, help="untimed runs before timing (default 5 on a GPU, 3 on the CPU)")
    p.add_argument("--repeats", type=int, help="timed runs at most (default 30 on a GPU, 10 on the CPU)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds one measurement may take; slow ones get fewer runs")
    p.add_argument("--time-limit", type=float, default=540.0,
                   help="seconds the whole run may take (default 540; 0: none): cases not started by then are "
                        "listed as skipped")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON and the plots")
    p.add_argument("--json", type=Path, help="JSON path (default OUT/bench.json)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--compare", type=Path, metavar="JSON",
                   help="an earlier run's JSON: print our times and speedups then and now, case by case")
    args = p.parse_args(argv)
    args.earlier = None  # (meta, rows) of --compare's report
    if args.compare is not None:
        try:
            args.earlier = read_report(args.compare)
        except (OSError, ValueError, TypeError, KeyError) as error:
            p.error(f"--compare {args.compare}: {error}")

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        p.error(f"--device: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device}")
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    on_gpu = args.device.type == "cuda"
    args.quick = args.quick or (not on_gpu and not args.full)
    for name in ("batch", "model_batch", "resolution"):
        value = getattr(args, name)
        if value is not None and value < (32 if name == "resolution" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {32 if name == 'resolution' else 1}, got {value}")
    for name in ("warmup", "repeats"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    if args.budget <= 0:
        p.error(f"--budget must be > 0, got {args.budget}")
    if args.time_limit < 0:
        p.error(f"--time-limit must be >= 0, got {args.time_limit}")
    if args.lengths and min(args.lengths) < 1:
        p.error(f"--lengths must be positive map sides, got {args.lengths}")

    args.stages = args.stages or (["b1-s1"] if args.quick else list(op_suite.STAGES))
    supported = ["float32", "float16", "bfloat16"] if on_gpu else ["float32", "bfloat16"]
    args.dtypes = args.dtypes or (["float32"] if args.quick else supported)
    args.batch = args.batch or (128 if on_gpu and not args.quick else 2)
    if args.lengths is None:
        args.lengths = [14, 28, 56, 112] if on_gpu else [14, 28, 56]
    args.resolution = args.resolution or (224 if on_gpu and not args.quick else 64)
    args.model_batch = args.model_batch or (64 if on_gpu and not args.quick else 2)
    args.compile = on_gpu if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 3)
    args.repeats = args.repeats or (30 if on_gpu else 10)
    args.json = args.json or args.out / "bench.json"
    return args


def _progress(items: list, desc: str, label: Callable[[object], str]) -> Iterable:
    """A tqdm bar on a terminal; elsewhere (a log, CI) one line per item on stderr, with the time so far."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(items, desc=desc, file=sys.stderr, leave=False)
    return _progress_lines(items, desc, label)


def _progress_lines(items: list, desc: str, label: Callable[[object], str]) -> Iterable:
    start = time.monotonic()
    for i, item in enumerate(items):
        print(f"[{desc} {i + 1}/{len(items)}, {time.monotonic() - start:.0f} s] {label(item)}", file=sys.stderr,
              flush=True)
        yield item


def _row_from(timing: Timing | None, base: dict, nbytes: int | None, copy_gbps: float, error: str | None) -> Row:
    row = Row(**base, bytes=nbytes, error=error)
    if timing is not None:
        row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
        row.repeats, row.peak_mem_mb = timing.repeats, timing.peak_mem_mb
        if nbytes:
            row.gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
            row.floor_fraction = nbytes / (copy_gbps * 1e9) / (timing.median_ms * 1e-3)
    return row


def _op_base(case: op_suite.OpCase, impl: op_suite.Impl, suite: str, mode: str) -> dict:
    return dict(suite=suite, name=case.op, shape=case.shape, dtype=str(case.dtype)[6:], mode=mode, impl=impl.name,
                info={**case.info, "batch": case.batch})


def _model_base(case: model_suite.ModelCase, args) -> dict:
    return dict(suite="models", name=case.name, shape=f"{args.resolution}x{args.resolution} b={args.model_batch}",
                dtype="bfloat16 autocast" if args.device.type == "cuda" else "float32", impl=case.impl,
                info={"batch": args.model_batch, "resolution": args.resolution, "compiled": case.compile})


SKIPPED = "skipped: --time-limit reached"


def run_case(case: op_suite.OpCase, suite: str, modes: tuple[str, ...], args, copy_gbps: float) -> list[Row]:
    """Times every implementation of one case in each mode; a failing implementation gives an error row."""
    inputs = case.make_inputs()
    rows = [row for impl in case.impls for row in _time_impl(case, impl, inputs, suite, modes, args, copy_gbps)]
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _time_impl(case: op_suite.OpCase, impl: op_suite.Impl, inputs: dict, suite: str, modes: tuple[str, ...], args,
               copy_gbps: float) -> list[Row]:
    with torch.no_grad():
        grad = torch.randn_like(impl.forward(inputs))
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}

    def forward() -> object:
        with torch.no_grad():
            return impl.forward(inputs)

    timed: dict[str, Callable[[], object]] = {
        "fwd": forward,
        "fwd+bwd": lambda: torch.autograd.grad(impl.forward(leaves), list(leaves.values()), grad),
    }
    if impl.prepare_backward is not None and "bwd" in modes:
        backward = impl.prepare_backward(inputs)
        timed["bwd"] = lambda: backward(grad)
    nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd, "fwd+bwd": case.bytes_fwd + case.bytes_bwd}
    rows = []
    for mode in (m for m in modes if m in timed):
        base = _op_base(case, impl, suite, mode)
        try:
            timing, error = measure(timed[mode], args.device, args.warmup, args.repeats, args.budget), None
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            timing, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        rows.append(_row_from(timing, base, nbytes[mode], copy_gbps, error))
    return rows


def run_model(case: model_suite.ModelCase, args) -> list[Row]:
    """Images/s of inference and of a training step of one model; a failure gives error rows."""
    device = args.device
    base = _model_base(case, args)
    rows = []
    try:
        model = model_suite.build(case, device)
        steps = model_suite.step_functions(model, case, args.model_batch, args.resolution, device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        return [Row(**base, mode=mode, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                for mode in ("infer", "train")]
    for mode, step in steps.items():
        try:
            timing, error = measure(step, device, args.warmup, args.repeats, args.budget), None
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            timing, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        row = _row_from(timing, {**base, "mode": mode}, None, 0.0, error)
        if timing is not None:
            row.images_per_s = args.model_batch / (timing.median_ms * 1e-3)
        rows.append(row)
    del model, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    meta = environment(device)
    copy_gbps = copy_bandwidth_gbps(device, 512 if device.type == "cuda" else 64)
    meta.update(copy_bandwidth_gbps=copy_gbps, quick=args.quick,
                args={k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()
                      if k != "earlier"})
    print(f"mamba-adaptor-bench on {meta['device_name']} ({device}), torch {meta['torch']}, CUDA {meta['cuda']}, "
          f"mamba_adaptor_ops {meta['mamba_adaptor_ops']}, copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    if device.type == "cuda" and not meta["cuda_kernels_loaded"]:
        print("warning: the CUDA kernels of mamba_adaptor_ops are not loaded: our CUDA rows will be errors",
              file=sys.stderr)

    dtypes = [DTYPES[d] for d in args.dtypes]
    deadline = time.monotonic() + args.time_limit if args.time_limit else float("inf")
    rows: list[Row] = []

    def op_cases(cases: list, suite: str, modes: tuple[str, ...]) -> None:
        for case in _progress(cases, suite, lambda c: f"{c.op} {c.shape} {str(c.dtype)[6:]}"):
            if time.monotonic() < deadline:
                rows.extend(run_case(case, suite, modes, args, copy_gbps))
            else:
                rows.extend(Row(**_op_base(case, impl, suite, m), error=SKIPPED) for impl in case.impls for m in modes
                            if m != "bwd" or impl.prepare_backward is not None)  # the rows a run would give

    if "ops" in args.suites:
        op_cases(op_suite.stage_cases(args.ops, args.stages, args.batch, dtypes, device), "ops", ("fwd", "bwd", "fwd+bwd"))
    if "ops" in args.suites and args.lengths:
        sweep_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        sweep_batch = 32 if device.type == "cuda" and not args.quick else 1
        op_cases(op_suite.length_sweep_cases(args.ops, args.lengths, sweep_batch, sweep_dtype, device), "length",
                 ("fwd",))
    if "models" in args.suites:
        model_cases = model_suite.model_cases(args.models, device, args.compile)
        for case in _progress(model_cases, "models", lambda c: f"{c.name} {c.impl}{' compiled' if c.compile else ''}"):
            if time.monotonic() < deadline:
                rows.extend(run_model(case, args))
            else:
                rows.extend(Row(**_model_base(case, args), mode=m, error=SKIPPED) for m in ("infer", "train"))
    skipped = sum(row.error == SKIPPED for row in rows)
    if skipped:
        print(f"warning: {skipped} rows skipped: the run reached --time-limit {args.time_limit:.0f} s", file=sys.stderr)
    add_speedups(rows)

    print(format_table(rows))
    goal_results = check_goals(rows, copy_gbps) if device.type == "cuda" else []  # goals of the CUDA kernels
    if goal_results:
        print("\n" + format_goals(goal_results, copy_gbps))
    if args.earlier is not None:
        earlier_meta, earlier_rows = args.earlier
        print("\n" + format_comparison(rows, meta, earlier_rows, earlier_meta))
    write_json(args.json, meta, rows, goals_json(goal_results))
    print(f"\nJSON: {args.json}")
    if not args.no_plots:
        title = f"{meta['device_name']}, torch {meta['torch']}, mamba_adaptor_ops {meta['mamba_adaptor_ops']}"
        plot_length_sweep(args.out / "ops_vs_length.png", rows, copy_gbps, title)
        plot_speedups(args.out / "ops_speedup.png", rows, title)
        plot_model_throughput(args.out / "models_throughput.png", rows, title)
        print(f"plots: {', '.join(str(p) for p in sorted(args.out.glob('*.png')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
