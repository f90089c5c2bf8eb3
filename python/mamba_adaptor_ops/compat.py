"""mamba_ssm's scan interface on this library's kernels, for code written against mamba_ssm.

    # from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_adaptor_ops.compat import selective_scan_fn

takes the same arguments and returns the same results (mamba_ssm 1.x and 2.x, real A), on the CPU and on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.selective_scan import checkpoint_segment, selective_scan

_TAIL_CHUNK = 32  # timesteps of the last state's tail composed at once


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's ``selective_scan_fn``: y = selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus),
    times silu(z) when z is given.

    u, delta, z: (b, dim, L); A: (dim, N), real; B, C: (b, N, L) (one group), (b, G, N, L), or (dim, N) (the same
    for every timestep, rounded to u's dtype, where mamba_ssm keeps it in float32); D, delta_bias: (dim,). Returns
    y (b, dim, L) in u's dtype and, with `return_last_state`, also the state after the last timestep, (b, dim, N)
    in float32, which (as in mamba_ssm) takes no gradient. `cu_seqlens` (mamba_ssm 2.x: sequences packed along L,
    the state starting from 0 again at each of cu_seqlens[1:-1]) scans each packed sequence apart.
    """
    if A.is_complex():
        raise TypeError("selective_scan_fn: complex A is not supported (mamba_adaptor_ops' scan is real); got "
                        f"A of dtype {A.dtype}")
    B, C = _grouped(B, "B", u), _grouped(C, "C", u)
    if cu_seqlens is not None:
        return _packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, cu_seqlens)
    if return_last_state:  # the op with the states at its segment ends (differentiable in y, as selective_scan)
        y, checkpoints = torch.ops.mamba_adaptor.selective_scan_forward(
            u, delta, A, B, C, D, delta_bias, delta_softplus, torch.are_deterministic_algorithms_enabled()
        )
    else:
        y = selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if z is not None:
        acc = torch.promote_types(y.dtype, torch.float32)
        y = (y.to(acc) * F.silu(z.to(acc))).to(y.dtype)
    if not return_last_state:
        return y
    with torch.no_grad():
        return y, _last_state(u, delta, A, B, delta_bias, delta_softplus, checkpoints)


def _packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, cu_seqlens):
    """selective_scan_fn over each packed sequence [cu_seqlens[i], cu_seqlens[i + 1]) of L, one call each."""
    L = u.shape[-1]
    bounds = cu_seqlens.tolist()
    if bounds != sorted(bounds) or bounds[0] < 0 or bounds[-1] > L:
        raise ValueError(f"selective_scan_fn: expected `cu_seqlens` to be non-decreasing within [0, L = {L}], "
                         f"got {bounds}")
    starts = [0, *(t for t in bounds[1:-1] if 0 < t < L), L]
    pieces = [
        selective_scan_fn(u[..., t0:t1], delta[..., t0:t1], A, B[..., t0:t1], C[..., t0:t1], D,
                          None if z is None else z[..., t0:t1], delta_bias, delta_softplus, return_last_state)
        for t0, t1 in zip(starts[:-1], starts[1:])
        if t1 > t0 or L == 0
    ]
    if not return_last_state:
        return torch.cat(pieces, dim=-1)
    return torch.cat([y for y, _ in pieces], dim=-1), pieces[-1][1]


def _grouped(t: Tensor, name: str, u: Tensor) -> Tensor:
    """B or C as the op takes them, (b, G, N, L): a view, or an expanded one of a (dim, N) matrix (group per
    channel; the op copies it out to full size)."""
    if t.dim() == 3:  # (b, N, L): one group
        return t.unsqueeze(1)
    if t.dim() == 2:  # (dim, N), the same at every timestep
        if t.is_complex():
            raise TypeError(f"selective_scan_fn: complex `{name}` is not supported; got dtype {t.dtype}")
        b, dim, L = u.shape
        return t.to(u.dtype)[None, :, :, None].expand(b, dim, t.shape[1], L)
    return t


def _last_state(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    checkpoints: Tensor,
) -> Tensor:
    """The state after timestep L - 1, (b, dim, N) float32: the last checkpoint carried through the remaining tail
    of at most one segment, _TAIL_CHUNK timesteps at a time in closed form,
    h -> exp(sum_t dA_t) h + sum_t exp(sum_{s > t} dA_s) dt_t B_t u_t, with dA_t = dt_t A."""
    b, dim, L = u.shape
    N = A.shape[1]
    n_checkpoints = checkpoints.shape[2]
    h = checkpoints[:, :, -1].float() if n_checkpoints else u.new_zeros(b, dim, N, dtype=torch.float32)
    A = A.float()
    per_group = dim // B.shape[1]
    for t0 in range(n_checkpoints * checkpoint_segment(u.dtype, N), L, _TAIL_CHUNK):
        t1 = min(L, t0 + _TAIL_CHUNK)
        dt = delta[..., t0:t1].float()  # (b, dim, T)
        if delta_bias is not None:
            dt = dt + delta_bias.float()[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        dA = dt[:, :, None] * A[:, :, None]  # (b, dim, N, T)
        drive = (dt * u[..., t0:t1].float())[:, :, None] * B[..., t0:t1].float().repeat_interleave(per_group, 1)
        after = dA.flip(-1).cumsum(-1).flip(-1) - dA  # sum over s > t within the chunk
        h = torch.exp(dA.sum(-1)) * h + (torch.exp(after) * drive).sum(-1)
    return h
