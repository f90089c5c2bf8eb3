"""`multi_dilation_dwconv2d`: Adaptor-S, the sum of dilated depthwise convolutions in one pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._autocast import register_autocast, to_autocast_dtype
from ._autograd import register_autograd

_OP = "mamba_adaptor::multi_dilation_dwconv2d"


def multi_dilation_dwconv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, dilations: Sequence[int] = (1, 2)
) -> Tensor:
    """bias + sum_i depthwise_conv2d(x, weight[i], dilation=dilations[i]), "same" zero padding each.

    x: (b, C, H, W), NCHW or channels_last (the output keeps x's memory format); weight:
    (len(dilations), C, k, k) with k in {3, 5, 7}; bias: (C,) or None; all one floating dtype. Equals the
    sum of ``torch.nn.functional.conv2d(x, weight[i, :, None], dilation=d, padding=d * (k - 1) // 2,
    groups=C)`` calls, computed in float32 with one read of x. Differentiable in x, weight and bias. Under
    torch.autocast, x, weight and bias run in the autocast dtype.
    """
    return _call(x, weight, bias, list(dilations))


@torch.library.register_fake(_OP)
def _fake(x, weight, bias=None, dilations=(1, 2)):
    return torch.empty_like(x)


@torch.library.register_fake("mamba_adaptor::multi_dilation_dwconv2d_backward")
def _fake_backward(grad_out, x, weight, bias, dilations):
    grad_bias = None if bias is None else x.new_empty(bias.shape)
    return torch.empty_like(x), x.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, dilations = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.dilations = dilations


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grads = torch.ops.mamba_adaptor.multi_dilation_dwconv2d_backward(grad, x, weight, bias, ctx.dilations)
    return (*grads, None)


_call = register_autograd(_OP, _backward, _setup_context)
register_autocast(_OP, to_autocast_dtype)
