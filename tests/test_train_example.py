"""examples/train_classifier.py: a short 2-process torchrun run on the CPU (DDP over gloo), then a resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_classifier.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchrun_two_processes_then_resume(tmp_path):
    common = ["--model", "mamba_adaptor_b1", "--img-size", "32", "--batch-size", "8", "--epochs", "2",
              "--val-samples", "32", "--output", str(tmp_path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           *common, "--max-steps", "3"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es) on cpu" in run.stdout

    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "3")]
    assert 0.0 <= float(rows[0]["val_acc"]) <= 1.0 and float(rows[0]["train_loss"]) > 0
    state = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and state["step"] == 3 and "stages.0.blocks.0.ssm.A_logs" in state["model"]

    result = _load_example().main([*common, "--max-steps", "5", "--resume", "auto"])  # one process
    assert result["epoch"] == 1 and result["step"] == 5
    logged = json.loads((tmp_path / "log.json").read_text())
    assert [(r["epoch"], r["step"]) for r in logged] == [(0, 3), (1, 5)]
    resumed = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=False)
    moved = any(not torch.equal(resumed["model"][k], v) for k, v in state["model"].items())
    assert moved, "the resumed run did not train"
