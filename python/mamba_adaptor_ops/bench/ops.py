"""The op suite: each op on the paper's shapes, this library against the baselines timed in the same run.

Shapes are those of Mamba-Adaptor-b1/b2 at 224x224 input: stage i has C channels per scan direction on an
H x W map (L = H * W), S = 4 scan directions, K = 4 Adaptor-T points, d_state N = 1, Adaptor-S 3x3 with
dilations (1, 2). Baselines: the plain-PyTorch reference of each op, torch's conv2d (cuDNN on a GPU) for
Adaptor-S, and mamba_ssm's `selective_scan_cuda` for the scan when it is importable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import reference
from ..ops import multi_dilation_dwconv2d, selective_scan, state_gather
from .report import OURS

# stage name -> (channels per direction C, map side H = W) at 224x224 input
STAGES: dict[str, tuple[int, int]] = {
    "b1-s1": (48, 56),
    "b1-s2": (96, 28),
    "b1-s3": (192, 14),
    "b1-s4": (384, 7),
    "b2-s1": (96, 56),
    "b2-s2": (192, 28),
    "b2-s3": (384, 14),
    "b2-s4": (768, 7),
}
DIRECTIONS = 4  # S: the cross-scan's four sequences
POINTS = 4  # K: Adaptor-T's gathered states per position
DILATIONS = (1, 2)
OPS = ("selective_scan", "state_gather", "multi_dilation_dwconv2d")


@dataclass
class Impl:
    """One implementation of an op: a differentiable forward and, where the implementation has a backward of
    its own to call, `prepare_backward(inputs)`, which does any forward work once and returns the backward
    call `grad_out -> grads` that is timed."""

    name: str
    forward: Callable[[dict[str, Tensor]], Tensor]
    prepare_backward: Callable[[dict[str, Tensor]], Callable[[Tensor], object]] | None = None


@dataclass
class OpCase:
    """One op at one shape and dtype, with the bytes a kernel must move at least (read inputs, write outputs)."""

    op: str
    shape: str
    batch: int
    dtype: torch.dtype
    make_inputs: Callable[[], dict[str, Tensor]]
    bytes_fwd: int
    bytes_bwd: int
    impls: list[Impl]
    info: dict = field(default_factory=dict)


def _ours(
    forward: Callable, backward_op, *flags, deterministic_too: bool, saved: Callable[[dict], tuple] = lambda x: ()
) -> list[Impl]:
    """This library's op, and with `deterministic_too` the same with deterministic=True (a second backward on
    CUDA; the CPU kernels are deterministic either way): forward(x, deterministic), and the backward op timed as
    backward_op(grad, *x.values(), *flags, deterministic, *saved(x)), saved(x) what the forward autograd runs
    keeps for it besides the inputs (the scan's checkpoints)."""

    def impl(deterministic: bool) -> Impl:
        def prepare_backward(x: dict[str, Tensor]) -> Callable[[Tensor], object]:
            extra = saved(x)
            return lambda grad: backward_op(grad, *x.values(), *flags, deterministic, *extra)

        name = f"{OURS} deterministic" if deterministic else OURS
        return Impl(name, lambda x: forward(x, deterministic), prepare_backward)

    return [impl(False), impl(True)] if deterministic_too else [impl(False)]


def _mamba_ssm_cuda_module() -> object | None:
    """mamba_ssm's compiled scan module (`selective_scan_cuda`), or None."""
    try:
        return importlib.import_module("selective_scan_cuda")
    except ImportError:
        return None


def _scan_case(
    shape: str, batch: int, C: int, side: int, dtype, device, d_state: int = 1, deterministic_too: bool = False
) -> OpCase:
    dim, L, G, N = DIRECTIONS * C, side * side, DIRECTIONS, d_state
    elem = torch.finfo(dtype).bits // 8

    def make_inputs() -> dict[str, Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(device=device, generator=g)
        return dict(
            u=torch.randn(batch, dim, L, dtype=dtype, **kw),
            delta=torch.randn(batch, dim, L, dtype=dtype, **kw) * 0.5,
            A=-torch.rand(dim, N, **kw) - 0.5,
            B=torch.randn(batch, G, N, L, dtype=dtype, **kw),
            C=torch.randn(batch, G, N, L, dtype=dtype, **kw),
            D=torch.randn(dim, **kw),
            delta_bias=torch.rand(dim, **kw),
        )

    impls = [
        *_ours(
            lambda x, deterministic: selective_scan(**x, delta_softplus=True, deterministic=deterministic),
            torch.ops.mamba_adaptor.selective_scan_backward,
            True,  # delta_softplus
            deterministic_too=deterministic_too,
            saved=lambda x: (torch.ops.mamba_adaptor.selective_scan_forward(**x, delta_softplus=True)[1],),
        ),
        Impl("reference", lambda x: reference.selective_scan(**x, delta_softplus=True)),
    ]
    peer = _mamba_ssm_cuda_module() if torch.device(device).type == "cuda" else None
    if peer is not None:
        impls.append(_mamba_ssm_impl(peer))
    reads_writes_fwd = 3 * batch * dim * L + 2 * batch * G * N * L  # u, delta, B, C in; y out
    reads_writes_bwd = 5 * batch * dim * L + 4 * batch * G * N * L  # u, delta, B, C, dy in; du, ddelta, dB, dC out
    return OpCase(
        "selective_scan", shape if d_state == 1 else f"{shape} N={N}", batch, dtype, make_inputs,
        elem * reads_writes_fwd, elem * reads_writes_bwd, impls, dict(L=L, channels=dim, d_state=N),
    )


def _mamba_ssm_impl(peer) -> Impl:
    """mamba_ssm's selective_scan_cuda.fwd/bwd (z = None), wrapped for the same inputs."""

    class Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, delta_bias):
            out, x, *_ = peer.fwd(u, delta, A, B, C, D, None, delta_bias, True)
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, x)
            return out

        @staticmethod
        def backward(ctx, dout):
            u, delta, A, B, C, D, delta_bias, x = ctx.saved_tensors
            du, ddelta, dA, dB, dC, dD, ddelta_bias, *_ = peer.bwd(
                u, delta, A, B, C, D, None, delta_bias, dout.contiguous(), x, None, None, True, False
            )
            return du, ddelta, dA, dB, dC, dD, ddelta_bias

    def prepare_backward(x: dict[str, Tensor]) -> Callable[[Tensor], object]:
        u, delta, A, B, C, D, delta_bias = x.values()
        _, saved, *_ = peer.fwd(u, delta, A, B, C, D, None, delta_bias, True)
        return lambda grad: peer.bwd(u, delta, A, B, C, D, None, delta_bias, grad, saved, None, None, True, False)

    return Impl("mamba_ssm", lambda x: Scan.apply(*x.values()), prepare_backward)


def _gather_case(shape: str, batch: int, C: int, side: int, dtype, device, deterministic_too: bool = False) -> OpCase:
    L, S, K = side * side, DIRECTIONS, POINTS
    elem = torch.finfo(dtype).bits // 8

    def make_inputs() -> dict[str, Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(device=device, generator=g)
        return dict(
            h=torch.randn(batch, S, C, L, dtype=dtype, **kw),
            offsets=(torch.randn(batch, S, K, L, **kw) * 4).to(dtype),
            weights=torch.softmax(torch.randn(batch, S, K, L, **kw), dim=2).to(dtype),
        )

    impls = [
        *_ours(
            lambda x, deterministic: state_gather(**x, deterministic=deterministic),
            torch.ops.mamba_adaptor.state_gather_backward,
            True,  # residual
            deterministic_too=deterministic_too,
        ),
        Impl("reference", lambda x: reference.state_gather(**x)),
    ]
    h, points = batch * S * C * L, batch * S * K * L  # elements of h (and out, dh); of offsets (weights, ...)
    reads_writes_fwd = 2 * h + 2 * points  # h, offsets, weights in; out
    reads_writes_bwd = 3 * h + 4 * points  # h, dout, offsets, weights in; dh, doff, dw
    return OpCase(
        "state_gather", shape, batch, dtype, make_inputs, elem * reads_writes_fwd, elem * reads_writes_bwd, impls,
        dict(L=L, channels=S * C, h_bytes=elem * h, points_bytes=elem * points),
    )


def _dwconv_case(shape: str, batch: int, C: int, side: int, dtype, device, channels_last: bool) -> OpCase:
    elem = torch.finfo(dtype).bits // 8
    k = 3

    def make_inputs() -> dict[str, Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(device=device, generator=g)
        x = torch.randn(batch, C, side, side, dtype=dtype, **kw)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        return dict(x=x, weight=torch.randn(len(DILATIONS), C, k, k, dtype=dtype, **kw) / k,
                    bias=torch.randn(C, dtype=dtype, **kw))

    def ours_backward(x: dict[str, Tensor]) -> Callable[[Tensor], object]:
        return lambda grad: torch.ops.mamba_adaptor.multi_dilation_dwconv2d_backward(grad, *x.values(), list(DILATIONS))

    impls = [
        Impl(OURS, lambda x: multi_dilation_dwconv2d(**x, dilations=DILATIONS), ours_backward),
        Impl("torch.conv2d", lambda x: reference.multi_dilation_dwconv2d(**x, dilations=DILATIONS)),
    ]
    plane = batch * C * side * side
    return OpCase(
        "multi_dilation_dwconv2d", f"{shape} {'NHWC' if channels_last else 'NCHW'}", batch, dtype, make_inputs,
        elem * 2 * plane, elem * 3 * plane, impls, dict(L=side * side, channels=C, channels_last=channels_last),
    )


def stage_cases(ops: list[str], stages: list[str], batch: int, dtypes: list[torch.dtype], device) -> list[OpCase]:
    """Every requested op on every requested stage shape and dtype (Adaptor-S in NCHW and channels_last; the
    scan also with d_state 16 at a quarter of the batch on stage b2-s1, as Mamba language models run it). On CUDA
    the scan and the gather are also timed with deterministic=True."""
    cuda = torch.device(device).type == "cuda"
    cases = []
    for dtype in dtypes:
        for stage in stages:
            C, side = STAGES[stage]
            if "selective_scan" in ops:
                cases.append(_scan_case(stage, batch, C, side, dtype, device, deterministic_too=cuda))
            if "state_gather" in ops:
                cases.append(_gather_case(stage, batch, C, side, dtype, device, deterministic_too=cuda))
            if "multi_dilation_dwconv2d" in ops:
                cases.extend(_dwconv_case(stage, batch, C, side, dtype, device, cl) for cl in (False, True))
        if "selective_scan" in ops and "b2-s1" in stages:
            cases.append(
                _scan_case("b2-s1", max(1, batch // 4), *STAGES["b2-s1"], dtype, device, 16, deterministic_too=cuda)
            )
    return cases


def length_sweep_cases(ops: list[str], sides: list[int], batch: int, dtype: torch.dtype, device) -> list[OpCase]:
    """Each op at b2 stage-1 channels on square maps of growing side: time against sequence length."""
    C = STAGES["b2-s1"][0]
    builders = {
        "selective_scan": lambda side: _scan_case(f"L={side * side}", batch, C, side, dtype, device),
        "state_gather": lambda side: _gather_case(f"L={side * side}", batch, C, side, dtype, device),
        "multi_dilation_dwconv2d": lambda side: _dwconv_case(f"L={side * side}", batch, C, side, dtype, device, False),
    }
    return [builders[op](side) for op in ops for side in sides]
