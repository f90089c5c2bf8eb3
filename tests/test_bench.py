"""The benchmark CLI: argument handling, the JSON and plots of a tiny CPU run, and the goals check."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_adaptor_ops.bench import cli
from mamba_adaptor_ops.bench.goals import (
    DETERMINISTIC,
    GOALS,
    H100_COPY_GBPS,
    as_json,
    check_goals,
    format_goals,
)
from mamba_adaptor_ops.bench.ops import OPS, stage_cases
from mamba_adaptor_ops.bench.report import OURS, SCHEMA, Row, format_comparison, read_report


def test_cpu_defaults_imply_quick():
    args = cli.parse_args(["--device", "cpu"])
    assert args.quick and args.stages == ["b1-s1"] and args.dtypes == ["float32"] and args.batch == 2
    assert args.resolution == 64 and args.model_batch == 2 and not args.compile
    full = cli.parse_args(["--device", "cpu", "--full"])
    assert not full.quick and len(full.stages) == 8 and full.dtypes == ["float32", "bfloat16"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "tpu"], "--device"),
        (["--device", "cpu", "--batch", "0"], "--batch must be >= 1, got 0"),
        (["--device", "cpu", "--resolution", "16"], "--resolution must be >= 32, got 16"),
        (["--device", "cpu", "--models", "resnet50"], "invalid choice: 'resnet50'"),
        (["--device", "cpu", "--quick", "--full"], "--quick and --full exclude each other"),
        (["--device", "cpu", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--device", "cpu", "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--device", "cpu", "--budget", "0"], "--budget must be > 0"),
        (["--device", "cpu", "--lengths", "0"], "--lengths must be positive"),
        (["--device", "cpu", "--time-limit", "-1"], "--time-limit must be >= 0, got -1"),
        (["--device", "cpu", "--ops", "conv"], "invalid choice: 'conv'"),
        (["--device", "cpu", "--stages", "b3-s1"], "invalid choice: 'b3-s1'"),
        (["--device", "cpu", "--compare", "no-such-report.json"], "--compare no-such-report.json: [Errno 2]"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tiny_run_writes_table_json_and_plots(tmp_path, capsys):
    argv = ["--device", "cpu", "--stages", "b1-s4", "--batch", "1", "--lengths", "5", "7", "--warmup", "0",
            "--repeats", "2", "--budget", "0.05", "--models", "vmamba_tiny", "--resolution", "32",
            "--model-batch", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "selective_scan" in table and "vs reference" in table and "vs torch.conv2d" in table

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["schema"] == SCHEMA
    assert report["goals"] == []  # the goals are the CUDA kernels'
    assert {"device", "torch", "mamba_adaptor_ops", "copy_bandwidth_gbps", "date"} <= report["meta"].keys()
    rows = report["rows"]
    ops_rows = [r for r in rows if r["suite"] == "ops"]
    assert {r["name"] for r in ops_rows} == {"selective_scan", "state_gather", "multi_dilation_dwconv2d"}
    assert {r["mode"] for r in ops_rows} == {"fwd", "bwd", "fwd+bwd"}
    for row in rows:
        assert row["error"] is None, row
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    for row in (r for r in rows if r["suite"] != "models"):
        assert row["bytes"] > 0 and row["gbps"] > 0 and row["floor_fraction"] > 0
    model_rows = [r for r in rows if r["suite"] == "models"]
    assert {(r["impl"], r["mode"]) for r in model_rows} == {
        (impl, mode) for impl in ("mamba_adaptor_ops", "reference scan") for mode in ("infer", "train")
    }
    assert all(r["images_per_s"] > 0 for r in model_rows)
    ours = [r for r in ops_rows if r["impl"] == "mamba_adaptor_ops" and r["mode"] != "bwd"]
    assert ours and all(r["speedup"] for r in ours)
    assert {r["info"]["L"] for r in rows if r["suite"] == "length"} == {25, 49}
    for plot in ("ops_vs_length.png", "ops_speedup.png", "models_throughput.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --compare reads such a report; compared with itself, every row of ours is the same case at 1.00x.
    assert cli.parse_args(["--device", "cpu", "--compare", str(tmp_path / "bench.json")]).earlier[0] == report["meta"]
    meta, earlier = read_report(tmp_path / "bench.json")
    lines = format_comparison(earlier, meta, earlier, meta).splitlines()
    assert lines[0].startswith(f"Compared with {meta['device_name']}, {meta['date']}") and "not this" not in lines[0]
    ours = [r for r in earlier if r.impl.startswith(OURS)]
    assert len(lines) == 3 + len(ours) and all(" 1.00x " in line for line in lines[3:])


def test_time_limit_lists_what_it_skipped(tmp_path, capsys):
    """Past --time-limit no case starts: its rows say so (in the table and the JSON), and the plots still come."""
    argv = ["--device", "cpu", "--stages", "b1-s4", "--batch", "1", "--lengths", "5", "--models", "vmamba_tiny",
            "--resolution", "32", "--model-batch", "1", "--time-limit", "1e-9", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "[ops 1/" in captured.err and "[models 1/" in captured.err  # progress lines without a terminal
    assert "rows skipped: the run reached --time-limit" in captured.err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["suite"] for r in rows} == {"ops", "length", "models"}
    assert all(r["error"] == cli.SKIPPED and r["median_ms"] is None for r in rows)
    assert not [r for r in rows if r["mode"] == "bwd" and r["impl"] == "reference"]  # which never has one
    assert cli.SKIPPED in captured.out


def _op_row(name, shape, dtype, mode, ms, batch=128, impl=OURS, peak_mem_mb=None, **info) -> Row:
    return Row("ops", name, shape, dtype, mode, impl, median_ms=ms, peak_mem_mb=peak_mem_mb,
               info={"batch": batch, **info})


def test_goals_met_short_or_not_run():
    MB = 2**20
    rows = [
        _op_row("selective_scan", "b2-s1", "bfloat16", "fwd", 0.01, batch=64),  # not the goal's batch
        _op_row("selective_scan", "b2-s1", "bfloat16", "fwd", 0.30),
        _op_row("selective_scan", "b2-s1", "bfloat16", "bwd", 1.65),
        _op_row("selective_scan", "b2-s1", "bfloat16", "fwd", 0.2, impl="reference"),  # not ours
        _op_row("selective_scan", "b2-s1 N=16", "bfloat16", "fwd", 1.0, batch=32),
        _op_row("state_gather", "b2-s1", "bfloat16", "bwd", 0.5),
        _op_row("state_gather", "b2-s1", "bfloat16", "bwd", 1.5, impl=DETERMINISTIC),
        _op_row("state_gather", "b2-s1", "bfloat16", "fwd+bwd", 1.0, peak_mem_mb=1000.0,
                h_bytes=300 * MB, points_bytes=20 * MB),
    ]
    results = {r.goal: r for r in check_goals(rows, H100_COPY_GBPS)}
    assert len(results) == 16
    assert results["selective_scan b2-s1 bfloat16 fwd"].verdict == "met"
    assert results["selective_scan b2-s1 bfloat16 bwd"].verdict == "short: 1.50x the goal"
    assert results["selective_scan b2-s3 bfloat16 fwd"].verdict == "not run"
    ratio = results["state_gather b2-s1 bfloat16 deterministic bwd / bwd"]
    assert ratio.measured == pytest.approx(3.0) and ratio.verdict == "short: 1.50x the goal"
    memory = results["state_gather b2-s1 bfloat16 fwd+bwd extra memory"]  # 1000 MB - out, dh, doff, dw
    assert memory.measured == pytest.approx(1000 - 640) and memory.target == 300
    assert memory.verdict == "short: 1.20x the goal"

    # A device that copies twice as fast: memory-bound goals halve, the compute-bound d_state-16 ones stay.
    doubled = {r.goal: r for r in check_goals(rows, 2 * H100_COPY_GBPS)}
    assert doubled["selective_scan b2-s1 bfloat16 fwd"].target == pytest.approx(0.20)
    assert doubled["selective_scan b2-s1 bfloat16 fwd"].verdict == "short: 1.50x the goal"
    assert doubled["selective_scan b2-s1 N=16 bfloat16 fwd"].target == 1.2
    assert doubled["selective_scan b2-s1 N=16 bfloat16 fwd"].verdict == "met"

    table = format_goals(list(results.values()), H100_COPY_GBPS)
    assert "selective_scan b2-s1 bfloat16 bwd" in table and "mamba_ssm 2.96 ms" in table and "not run" in table
    assert {"goal", "target", "unit", "measured", "verdict"} <= as_json(list(results.values()))[0].keys()



def test_comparison_matches_cases_and_speedups(tmp_path):
    """A case is the same op, shape, dtype, mode, implementation and info (batch, sizes); a speedup is compared
    where both runs timed its baseline; a report of another device says to compare speedups."""
    then = [
        _op_row("state_gather", "b2-s1", "bfloat16", "fwd", 2.0),
        _op_row("state_gather", "b2-s1", "bfloat16", "fwd", 3.0, batch=64),
        _op_row("selective_scan", "b2-s1", "bfloat16", "fwd", 1.0),
    ]
    then[0].speedup = {"reference": 10.0}
    now = [
        _op_row("state_gather", "b2-s1", "bfloat16", "fwd", 0.5),
        _op_row("state_gather", "b2-s1", "bfloat16", "fwd", 1.0, batch=32),
    ]
    now[0].speedup = {"reference": 40.0, "mamba_ssm": 2.0}
    table = format_comparison(now, {"device_name": "B"}, then, {"device_name": "A", "date": "d", "torch": "t"})
    lines = table.splitlines()
    assert lines[0].startswith("Compared with A, d, torch t") and "not this B" in lines[0]
    assert len(lines) == 4  # header, dashes, the one case in common (batch 128)
    assert lines[3].split()[6:] == ["2", "0.5", "4.00x", "10.00x", "->", "40.00x", "vs", "reference"]
    assert "no case in common" in format_comparison(now[1:], {}, then, {})

    not_a_report = tmp_path / "other.json"
    not_a_report.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="schema"):
        read_report(not_a_report)


def test_every_goal_names_a_case_of_the_op_suite():
    """A goal whose name, shape, dtype or batch no case has would always read `not run`."""
    cases = stage_cases(list(OPS), ["b2-s1", "b2-s3"], 128, [torch.float32, torch.bfloat16], "cpu")
    names = {(c.op, c.shape, str(c.dtype)[6:], c.batch) for c in cases}
    assert {(g.name, g.shape, g.dtype, g.batch) for g in GOALS} <= names
