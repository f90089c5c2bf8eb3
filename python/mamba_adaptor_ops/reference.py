"""Plain-PyTorch definitions of the three ops: what the kernels are tested against.

Each function computes in float32 (float64 for float64 inputs), like the kernels, and returns the input's
dtype. They are written for clarity, not speed: the scan walks L in a Python loop and the gather
materialises every interpolated sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor | None,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The selective scan; see `mamba_adaptor_ops.selective_scan` for shapes and semantics.

    u, delta (b, dim, L); A (dim, N); B, C (b, G, N, L); D, delta_bias (dim,). Returns y (b, dim, L), or the
    hidden states (b, dim, N, L) when C is None.
    """
    acc = _acc_dtype(u.dtype)
    dim, L = u.shape[1], u.shape[2]
    per_group = dim // B.shape[1]
    u_, dt = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B_ = B.to(acc).repeat_interleave(per_group, dim=1)  # (b, dim, N, L)
    decay = torch.exp(dt[:, :, None, :] * A.to(acc)[None, :, :, None])  # (b, dim, N, L)
    drive = (dt * u_)[:, :, None, :] * B_  # (b, dim, N, L)
    h = decay.new_zeros(decay.shape[:-1])  # (b, dim, N)
    states = []
    # unbind, not decay[..., t]: the backward of L selects would write L zero-filled (b, dim, N, L) gradients
    for decay_t, drive_t in zip(decay.unbind(-1), drive.unbind(-1)):
        h = decay_t * h + drive_t
        states.append(h)
    hs = torch.stack(states, dim=-1) if L else decay.new_zeros(decay.shape)  # (b, dim, N, L)
    if C is None:
        return hs.to(u.dtype)
    y = (hs * C.to(acc).repeat_interleave(per_group, dim=1)).sum(dim=2)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_
    return y.to(u.dtype)


def state_gather(h: Tensor, offsets: Tensor, weights: Tensor, residual: bool = True) -> Tensor:
    """Adaptor-T's aggregation; see `mamba_adaptor_ops.state_gather`.

    h (b, S, D, L); offsets, weights (b, S, K, L). Sample k of position t reads h at t + offsets[..., k, t],
    linearly interpolated between its two integer neighbours, a neighbour outside [0, L-1] reading 0.
    """
    acc = _acc_dtype(h.dtype)
    b, S, D, L = h.shape
    K = offsets.shape[2]
    h_, w = h.to(acc), weights.to(acc)
    pos = torch.arange(L, device=h.device, dtype=acc) + offsets.to(acc)  # (b, S, K, L)
    lo = torch.floor(pos)
    frac = pos - lo  # NaN for a non-finite position, which makes the output NaN
    out = h_ if residual else torch.zeros_like(h_)
    for index, coef in ((lo, 1 - frac), (lo + 1, frac)):
        valid = (index >= 0) & (index <= L - 1)
        safe = torch.where(valid, index, torch.zeros_like(index)).long()
        vals = torch.gather(h_, 3, safe.reshape(b, S, 1, K * L).expand(b, S, D, K * L)).reshape(b, S, D, K, L)
        vals = torch.where(valid[:, :, None], vals, torch.zeros_like(vals))
        out = out + ((w * coef)[:, :, None] * vals).sum(dim=3)
    return out.to(h.dtype)


def multi_dilation_dwconv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, dilations: Sequence[int] = (1, 2)
) -> Tensor:
    """Adaptor-S: the sum of `len(dilations)` depthwise convolutions with "same" zero padding.

    x (b, C, H, W); weight (len(dilations), C, k, k); bias (C,) or None.
    """
    channels, k = x.shape[1], weight.shape[-1]
    if 0 in x.shape[1:]:  # no channel or an empty plane, which torch's conv2d rejects: an empty output
        return x.clone() if bias is None else x + bias.view(1, -1, 1, 1)
    out = sum(
        F.conv2d(x, weight[i].unsqueeze(1), padding=d * (k - 1) // 2, dilation=d, groups=channels)
        for i, d in enumerate(dilations)
    )
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
