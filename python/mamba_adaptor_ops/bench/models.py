"""The model suite: images/s of inference and of training steps, for this library's models and for VMamba-T
built on baseline parts (the plain-PyTorch reference scan, and mamba_ssm's scan when it is importable), in
the same run, with torch.compile off and on."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..models import create_model
from ..nn import ss2d
from .report import OURS

MODELS = ("vmamba_tiny", "mamba_adaptor_b1", "mamba_adaptor_b2")


@dataclass
class ModelCase:
    """One model built with one scan implementation (None: this library's op)."""

    name: str
    impl: str
    scan: Callable | None = None
    compile: bool = False


@contextlib.contextmanager
def scan_implementation(scan: Callable | None) -> Iterator[None]:
    """Runs the SS2D blocks with `scan` (same signature as `mamba_adaptor_ops.selective_scan`) in place of
    this library's op, for the duration of the block: how VMamba-T is built from baseline parts."""
    if scan is None:
        yield
        return
    saved = ss2d.selective_scan
    ss2d.selective_scan = scan
    try:
        yield
    finally:
        ss2d.selective_scan = saved


def _mamba_ssm_scan() -> Callable | None:
    """mamba_ssm's selective_scan_fn with this library's argument order (its 7th argument is z), or None."""
    try:
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except ImportError:
        return None

    def scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
        return interface.selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus)

    return scan


def model_cases(names: list[str], device: torch.device, compile_models: bool) -> list[ModelCase]:
    """Our models (compiled too when `compile_models`), and VMamba-T on the reference scan and on mamba_ssm's."""
    cases = [ModelCase(name, OURS) for name in names]
    if compile_models:
        cases += [ModelCase(name, f"{OURS} compiled", compile=True) for name in names]
    if "vmamba_tiny" in names:
        cases.append(ModelCase("vmamba_tiny", "reference scan", reference.selective_scan))
        peer = _mamba_ssm_scan() if device.type == "cuda" else None
        if peer is not None:
            cases.append(ModelCase("vmamba_tiny", "mamba_ssm scan", peer))
    return cases


def build(case: ModelCase, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(case.name, num_classes=1000).to(device)
    return torch.compile(model) if case.compile else model


def step_functions(
    model: nn.Module, case: ModelCase, batch: int, resolution: int, device: torch.device
) -> dict[str, Callable[[], object]]:
    """The timed calls: "infer" (eval, no grad) and "train" (forward, cross-entropy, backward, SGD step).
    On CUDA both run under bfloat16 autocast, as these models are trained; on the CPU in float32."""
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def autocast():
        return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def infer() -> object:
        model.eval()
        with torch.no_grad(), autocast(), scan_implementation(case.scan):
            return model(images)

    def train() -> object:
        model.train()
        with autocast(), scan_implementation(case.scan):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return {"infer": infer, "train": train}
