"""FLOP formulas of the three ops for `torch.utils.flop_counter.FlopCounterMode`.

FlopCounterMode counts 2 FLOPs per multiply-accumulate (its matmul and convolution formulas do), so each
formula here returns twice the op's multiply-accumulates (MACs) and `count_macs` halves the total: the
papers' "GFLOPs" (VMamba, Mamba-Adaptor) are MACs. Elementwise work (exp, softplus, adds) is not counted,
as fvcore does not count it for the papers' tables. The MACs per op:

- selective_scan, y mode: 9 per (b, channel, state, t) plus 1 per (b, channel, t) when D is given (VMamba's
  count, after state-spaces/mamba issue 110); states mode (C = None): 8 per (b, channel, state, t), no C h
  contraction and no D u. Backward: twice the forward.
- state_gather: 2 per (b, s, d, t) and point k (two interpolation neighbours). Backward: three times the
  forward (grad h, grad offsets and grad weights each redo the interpolation over D).
- multi_dilation_dwconv2d: k*k per output element and dilation (what `F.conv2d(groups=C)` is counted).
  Backward: twice the forward (grad x and grad weight).

Importing `mamba_adaptor_ops` registers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from . import _library  # noqa: F401  (registers torch.ops.mamba_adaptor.*, whose packets are keys below)

_ops = torch.ops.mamba_adaptor


def _selective_scan_macs(u_shape, A_shape, C_shape, D_shape) -> int:
    b, dim, L = u_shape
    N = A_shape[1]
    if C_shape is None:
        return 8 * b * dim * N * L
    return 9 * b * dim * N * L + (0 if D_shape is None else b * dim * L)


def _state_gather_macs(h_shape, offsets_shape) -> int:
    b, S, D, L = h_shape
    K = offsets_shape[2]
    return 2 * K * b * S * D * L


def _dwconv_macs(x_shape, weight_shape) -> int:
    n_dil, C, k, k2 = weight_shape
    return n_dil * k * k2 * math.prod(x_shape)


def _selective_scan_flop(u, delta, A, B, C, D=None, *_, out_shape=None, **__):
    return 2 * _selective_scan_macs(u, A, C, D)


def _selective_scan_backward_flop(grad_out, u, delta, A, B, C, D=None, *_, out_shape=None, **__):
    return 2 * 2 * _selective_scan_macs(u, A, C, D)


def _state_gather_flop(h, offsets, weights, residual=True, deterministic=False, out_shape=None):
    return 2 * _state_gather_macs(h, offsets)


def _state_gather_backward_flop(grad_out, h, offsets, weights, residual, deterministic, out_shape=None):
    return 3 * 2 * _state_gather_macs(h, offsets)


def _dwconv_flop(x, weight, bias=None, dilations=(1, 2), out_shape=None):
    return 2 * _dwconv_macs(x, weight)


def _dwconv_backward_flop(grad_out, x, weight, bias, dilations, out_shape=None):
    return 2 * 2 * _dwconv_macs(x, weight)


_FORMULAS: dict[object, Callable[..., int]] = {
    _ops.selective_scan: _selective_scan_flop,
    _ops.selective_scan_forward: _selective_scan_flop,
    _ops.selective_scan_backward: _selective_scan_backward_flop,
    _ops.state_gather: _state_gather_flop,
    _ops.state_gather_backward: _state_gather_backward_flop,
    _ops.multi_dilation_dwconv2d: _dwconv_flop,
    _ops.multi_dilation_dwconv2d_backward: _dwconv_backward_flop,
}

# FlopCounterMode keys its registry by op packet (torch.ops.mamba_adaptor.<op>), which covers `.default`.
for _packet, _formula in _FORMULAS.items():
    if _packet not in flop_registry:
        register_flop_formula(_packet)(_formula)


def count_macs(module: nn.Module, *inputs: torch.Tensor, **kwargs) -> int:
    """Multiply-accumulates of one forward of `module(*inputs, **kwargs)`, counted by FlopCounterMode.

    Runs the forward under ``torch.no_grad()``; a module and inputs on the ``meta`` device count without
    computing anything (every op here has a fake kernel). Returns FlopCounterMode's total divided by 2.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return counter.get_total_flops() // 2


__all__ = ["count_macs"]
