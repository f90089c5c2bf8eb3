"""torch.compile(fullgraph=True) traces all three ops (fake kernels, autograd) without graph breaks, static or with
dynamic shapes, and a model with them deploys through torch.export (saved and loaded, dynamic shapes too) and
AOTInductor (a compiled package)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mamba_adaptor_ops as mao


class TinyAdaptorBlock(nn.Module):
    """Scan in states mode -> Adaptor-T -> y = C h' + D u -> Adaptor-S, on a 2-direction unfold of an H x W map."""

    def __init__(self, channels: int = 4, size: int = 5) -> None:
        super().__init__()
        self.size = size
        self.A = nn.Parameter(-torch.rand(2 * channels, 1) - 0.5)
        self.D = nn.Parameter(torch.ones(2 * channels))
        self.adaptor_t = mao.AdaptorT(channels, num_points=3, num_sequences=2)
        self.adaptor_s = mao.AdaptorS(channels, dilations=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, C, H, W)
        b, C, H, W = x.shape
        u = torch.cat([x.flatten(2), x.flatten(2).flip(-1)], dim=1)  # (b, 2C, L): two directions
        delta = torch.sigmoid(u)
        B = u.view(b, 2, C, H * W).mean(2, keepdim=True)  # (b, G=2, N=1, L)
        states = mao.selective_scan(u, delta, self.A, B, None)  # (b, 2C, 1, L)
        h = self.adaptor_t(states.view(b, 2, C, H * W))
        y = h * B + self.D.view(1, 2, C, 1) * u.view(b, 2, C, H * W)  # y = C h' + D u with C = B
        merged = y[:, 0] + y[:, 1].flip(-1)  # (b, C, L)
        return self.adaptor_s(merged.view(b, C, H, W))


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = TinyAdaptorBlock()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    eager = model(x)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)

    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, grad_eager)


def test_compile_dynamic_shapes_one_graph_for_every_size():
    """Detection and segmentation backbones meet a new image size per batch: with dynamic=True the fake kernels
    trace a symbolic batch, H and W, and one compiled graph serves every size without recompiling."""
    torch.manual_seed(0)
    model = TinyAdaptorBlock()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(2, 4, 5, 6), (3, 4, 7, 9), (5, 4, 11, 3)]:  # sizes distinct, none 0 or 1 (specialised)
            x = torch.randn(*shape, requires_grad=True)
            eager = model(x)
            (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
            out = compiled(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
            torch.testing.assert_close(out, eager)
            torch.testing.assert_close(grad, grad_eager)


def test_export_with_dynamic_batch_and_size():
    """One exported program for every batch and image size in its ranges."""
    torch.manual_seed(0)
    model = TinyAdaptorBlock().eval()
    Dim = torch.export.Dim
    dims = {0: Dim("batch"), 2: Dim("H", min=2, max=64), 3: Dim("W", min=2, max=64)}
    exported = torch.export.export(model, (torch.randn(2, 4, 5, 5),), dynamic_shapes=(dims,))
    for shape in [(3, 4, 7, 6), (1, 4, 9, 4)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x))


def test_export_save_load_and_aot_inductor_package(tmp_path: Path):
    torch.manual_seed(0)
    model = TinyAdaptorBlock().eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        eager = model(x)
    exported = torch.export.export(model, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if "mamba_adaptor" in str(node.target)}
    names = ("selective_scan", "state_gather", "multi_dilation_dwconv2d")
    assert ops == {f"mamba_adaptor.{name}.default" for name in names}
    torch.export.save(exported, tmp_path / "block.pt2")
    loaded = torch.export.load(tmp_path / "block.pt2")
    torch.testing.assert_close(loaded.module()(x), eager)

    # The package is deployed as it would be: loaded and run in a fresh process that imports this library (a
    # crash there, as torch 2.11's loader had on a GPU machine, fails the test instead of ending the run).
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "block_aoti.pt2"))
    torch.save((x, eager), tmp_path / "io.pt")
    run = (
        "import torch, mamba_adaptor_ops; "
        f"x, eager = torch.load({str(tmp_path / 'io.pt')!r}); "
        f"torch.testing.assert_close(torch._inductor.aoti_load_package({package!r})(x), eager)"
    )
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the AOTInductor package, exit {result.returncode}:\n{result.stderr[-4000:]}"


def test_compiled_states_mode_reports_a_bad_rank_as_eager_does():
    """The states-mode fake kernel reads sizes of u and A: a wrong rank is the kernels' error under compile too."""
    A, B = -torch.rand(4, 1), torch.randn(2, 1, 1, 7)  # (dim, N), (b, G, N, L)
    compiled = torch.compile(torch.ops.mamba_adaptor.selective_scan, fullgraph=True, dynamic=False, backend="eager")
    for u, a, name in [(torch.randn(4, 7), A, "u"), (torch.randn(2, 4, 7), A[:, 0], "A")]:
        with pytest.raises(RuntimeError) as eager:
            torch.ops.mamba_adaptor.selective_scan(u, u.abs(), a, B, None)
        assert f"expected `{name}` to be a" in str(eager.value)
        with pytest.raises(RuntimeError, match=re.escape(str(eager.value))):
            compiled(u, u.abs(), a, B, None)
