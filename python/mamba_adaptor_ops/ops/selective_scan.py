"""`selective_scan`: the Mamba recurrence, with a states mode for Adaptor-T (the paper's C = 1, D = 0 trick)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._autocast import register_autocast, scan_autocast
from ._autograd import needs_grad, register_autograd

_OP = "mamba_adaptor::selective_scan"
# selective_scan with the checkpoints its backward starts from: what autograd runs when it records a backward.
_FORWARD_OP = "mamba_adaptor::selective_scan_forward"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor | None,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    deterministic: bool | None = None,
) -> Tensor:
    """Runs h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t and y_t = C_t h_t + D u_t along L, per channel.

    u, delta: (b, dim, L), float32/float64/float16/bfloat16; A: (dim, N) float32 (float64 with float64
    inputs); B, C: (b, G, N, L) in u's dtype, channel d using group d // (dim / G); D, delta_bias: (dim,)
    like A, or None. dt = delta + delta_bias, passed through softplus when `delta_softplus`. Returns y
    (b, dim, L) in u's dtype; with ``C=None`` (states mode, D must be None) returns the hidden states
    (b, dim, N, L) instead. Differentiable in every tensor argument; computes in float32. `deterministic`
    makes the CUDA backward bit-identical across runs (no float atomics; more workspace; the CPU backward
    always is); default: torch.are_deterministic_algorithms_enabled(). Under torch.autocast, u, delta, B and C
    run in the autocast dtype, A, D and delta_bias in float32.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (u, delta, A, B, C, D, delta_bias, delta_softplus, deterministic)
    # torch.export traces with grad enabled, mostly for inference: the plain op there.
    if needs_grad(args) and not torch.compiler.is_exporting():
        return _call_forward(*args)[0]
    return _call(*args)


def _check_rank(t: Tensor, name: str, rank: int, layout: str) -> None:
    """The kernels' rank check (cpp/common/check.cpp), word for word."""
    if t.dim() != rank:
        raise RuntimeError(
            f"selective_scan: expected `{name}` to be a {rank}-D tensor {layout}, but got a {t.dim()}-D tensor of "
            f"shape {tuple(t.shape)}"
        )


@torch.library.register_fake(_OP)
def _fake(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, deterministic=False):
    # The kernels check every argument when they run. Under torch.compile this runs first: it checks the ranks
    # of the tensors whose sizes it reads, so that a bad rank gets the kernels' message, not an IndexError.
    if C is None:
        _check_rank(u, "u", 3, "(b, dim, L)")
        _check_rank(A, "A", 2, "(dim, N)")
        return u.new_empty(u.shape[0], u.shape[1], A.shape[1], u.shape[2])
    return u.new_empty(u.shape)


def checkpoint_segment(dtype: torch.dtype, N: int) -> int:
    """S, the timesteps between two of selective_scan_forward's checkpoints, for inputs of `dtype` and d_state N
    (cpp/selective_scan.h, selective_scan_segment): checkpoints[:, :, k] is the state after timestep (k + 1) S - 1."""
    return 256 if N == 1 and dtype in (torch.float16, torch.bfloat16) else 128


@torch.library.register_fake(_FORWARD_OP)
def _fake_forward(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, deterministic=False):
    # checkpoints (b, dim, (L - 1) // S, N), A's dtype: the state after each of the backward's segments of S
    # timesteps but the last.
    b, dim, L = u.shape
    N = A.shape[1]
    S = checkpoint_segment(u.dtype, N)
    checkpoints = A.new_empty(b, dim, torch.sym_max((L - 1) // S, 0), N)
    return _fake(u, delta, A, B, C, D, delta_bias, delta_softplus, deterministic), checkpoints


@torch.library.register_fake("mamba_adaptor::selective_scan_backward")
def _fake_backward(
    grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus, deterministic=False, checkpoints=None
):
    def like(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.new_empty(t.shape)

    return like(u), like(u), like(A), like(B), None if C is None else like(B), like(D), like(delta_bias)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, deterministic = inputs
    checkpoints = None
    if isinstance(output, tuple):  # selective_scan_forward's (out, checkpoints)
        checkpoints = output[1]
        ctx.mark_non_differentiable(checkpoints)
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, checkpoints)
    ctx.delta_softplus = delta_softplus
    ctx.deterministic = deterministic


def _backward(ctx, grad, *_):  # *_: selective_scan_forward's checkpoints, which take no gradient
    u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
    grads = torch.ops.mamba_adaptor.selective_scan_backward(
        grad, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, ctx.deterministic, checkpoints
    )
    return (*grads, None, None)


# A backward from the checkpoints where selective_scan records one; a direct torch.ops...selective_scan call
# records one whose backward computes them itself (a first pass over the inputs, on CUDA).
_call = register_autograd(_OP, _backward, _setup_context)
_call_forward = register_autograd(_FORWARD_OP, _backward, _setup_context, guard_backward_op=False)
register_autocast(_OP, scan_autocast)
register_autocast(_FORWARD_OP, scan_autocast)
