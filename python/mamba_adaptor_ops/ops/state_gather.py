"""`state_gather`: Adaptor-T's aggregation of K hidden states at learned (fractional) positions."""

from __future__ import annotations

import torch
from torch import Tensor

from ._autocast import register_autocast, to_widest_dtype
from ._autograd import register_autograd

_OP = "mamba_adaptor::state_gather"


def state_gather(
    h: Tensor, offsets: Tensor, weights: Tensor, residual: bool = True, deterministic: bool | None = None
) -> Tensor:
    """out[b,s,d,t] = [h[b,s,d,t] if residual] + sum_k weights[b,s,k,t] * h[b,s,d, t + offsets[b,s,k,t]].

    h: (b, S, D, L); offsets, weights: (b, S, K, L) in h's dtype (float32/float64/float16/bfloat16). A
    fractional position is read by linear interpolation between its two integer neighbours, a neighbour
    outside [0, L-1] reading 0; a non-finite offset gives a non-finite output. `weights` (and `offsets`) may
    be expanded views, e.g. coefficients shared over b and L: they are read through their strides, never
    copied. Returns (b, S, D, L) in h's dtype. Differentiable in h, offsets and weights; `deterministic`
    makes the backward bit-identical across runs (default: torch.are_deterministic_algorithms_enabled()).
    Under torch.autocast, h, offsets and weights run in the widest of their dtypes.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _call(h, offsets, weights, residual, deterministic)


@torch.library.register_fake(_OP)
def _fake(h, offsets, weights, residual=True, deterministic=False):
    return h.new_empty(h.shape)


@torch.library.register_fake("mamba_adaptor::state_gather_backward")
def _fake_backward(grad_out, h, offsets, weights, residual, deterministic):
    return h.new_empty(h.shape), h.new_empty(offsets.shape), h.new_empty(offsets.shape)


def _setup_context(ctx, inputs, output):
    h, offsets, weights, residual, deterministic = inputs
    ctx.save_for_backward(h, offsets, weights)
    ctx.residual = residual
    ctx.deterministic = deterministic


def _backward(ctx, grad):
    h, offsets, weights = ctx.saved_tensors
    grads = torch.ops.mamba_adaptor.state_gather_backward(
        grad, h, offsets, weights, ctx.residual, ctx.deterministic
    )
    return (*grads, None, None)


_call = register_autograd(_OP, _backward, _setup_context)
register_autocast(_OP, to_widest_dtype)
