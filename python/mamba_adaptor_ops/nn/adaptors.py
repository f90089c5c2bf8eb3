"""Adaptor-T and Adaptor-S as modules (Mamba-Adaptor, CVPR 2025, Sec. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..ops import multi_dilation_dwconv2d, state_gather


def default_offsets(num_points: int) -> list[float]:
    """The static positions of Adaptor-T relative to t: -1, +1, -2, +2, ... (the nearest states first)."""
    return [float((k // 2 + 1) * (-1 if k % 2 == 0 else 1)) for k in range(num_points)]


class AdaptorT(nn.Module):
    """Adaptor-T (memory retention): h'_t = h_t + sum_k c_k * h(t + p_k), per sequence s.

    forward(h): h (b, S, D, L) hidden states of S sequences -> (b, S, D, L).

    positions: "learnable" predicts the K offsets p_k from h_t with a linear layer phi_p (initialised to the
        static offsets), "static" uses fixed offsets (`static_offsets`, default -1, +1, -2, +2, ...).
    coefficients: "predicted" computes c_k = softmax(phi_c(h_t)) (sequential form); "shared" learns one
        softmax-normalised set of K coefficients per sequence, shared over batch and positions (the parallel
        form's weight-sharing coefficients; passed to the kernel as an expanded view, never copied).
    """

    def __init__(
        self,
        dim: int,
        num_points: int = 4,
        num_sequences: int = 4,
        positions: Literal["learnable", "static"] = "learnable",
        coefficients: Literal["predicted", "shared"] = "predicted",
        static_offsets: Sequence[float] | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if positions not in ("learnable", "static"):
            raise ValueError(f"AdaptorT: positions must be 'learnable' or 'static', got {positions!r}")
        if coefficients not in ("predicted", "shared"):
            raise ValueError(f"AdaptorT: coefficients must be 'predicted' or 'shared', got {coefficients!r}")
        offsets = list(static_offsets) if static_offsets is not None else default_offsets(num_points)
        if len(offsets) != num_points:
            raise ValueError(
                f"AdaptorT: static_offsets must hold num_points = {num_points} values, got {len(offsets)}"
            )
        self.dim, self.num_points, self.num_sequences = dim, num_points, num_sequences
        self.positions, self.coefficients, self.residual = positions, coefficients, residual
        self.register_buffer("static_offsets", torch.tensor(offsets, dtype=torch.float32))
        # phi_p: starts at the static offsets and learns to move them with h_t.
        self.offset_proj = nn.Linear(dim, num_points) if positions == "learnable" else None
        # phi_c, or the shared coefficients (uniform at init).
        self.coef_proj = nn.Linear(dim, num_points) if coefficients == "predicted" else None
        self.shared_coef = nn.Parameter(torch.zeros(num_sequences, num_points)) if coefficients == "shared" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.offset_proj is not None:
            nn.init.zeros_(self.offset_proj.weight)
            with torch.no_grad():
                self.offset_proj.bias.copy_(self.static_offsets)
        if self.coef_proj is not None:
            nn.init.normal_(self.coef_proj.weight, std=self.dim**-0.5)
            nn.init.zeros_(self.coef_proj.bias)
        if self.shared_coef is not None:
            nn.init.zeros_(self.shared_coef)

    def _project(self, h: Tensor, layer: nn.Linear) -> Tensor:
        # (b, S, D, L) -> (b, S, K, L): the linear layer applied to every h_t.
        return torch.einsum("bsdl,kd->bskl", h, layer.weight.to(h.dtype)) + layer.bias.to(h.dtype)[:, None]

    def forward(self, h: Tensor) -> Tensor:
        b, S, D, L = h.shape
        K = self.num_points
        if self.offset_proj is not None:
            offsets = self._project(h, self.offset_proj)
        else:
            offsets = self.static_offsets.to(h.dtype).view(1, 1, K, 1).expand(b, S, K, L)
        if self.coef_proj is not None:
            weights = torch.softmax(self._project(h, self.coef_proj).float(), dim=2).to(h.dtype)
        else:
            if S != self.num_sequences:
                raise ValueError(f"AdaptorT: built for {self.num_sequences} sequences, got h with S = {S}")
            coef = torch.softmax(self.shared_coef.float(), dim=-1).to(h.dtype)
            weights = coef.view(1, S, K, 1).expand(b, S, K, L)
        return state_gather(h, offsets, weights, residual=self.residual)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_points={self.num_points}, num_sequences={self.num_sequences}, "
            f"positions={self.positions}, coefficients={self.coefficients}, residual={self.residual}"
        )


class AdaptorS(nn.Module):
    """Adaptor-S (spatial locality): the sum of depthwise k x k convolutions with several dilations.

    forward(x): x (b, C, H, W), NCHW or channels_last -> (b, C, H, W) in the same memory format.
    `zero_init` starts the weights (and bias) at zero, for a branch that must not change a pretrained output.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2),
        bias: bool = True,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.dilations = channels, kernel_size, tuple(int(d) for d in dilations)
        self.zero_init = zero_init
        self.weight = nn.Parameter(torch.empty(len(self.dilations), channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.zero_init:
            nn.init.zeros_(self.weight)
        else:  # as nn.Conv2d(groups=C) does, per dilation: fan-in k*k
            bound = 1.0 / math.sqrt(self.kernel_size * self.kernel_size)
            nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return multi_dilation_dwconv2d(x, weight, bias, self.dilations)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, dilations={self.dilations}"


__all__ = ["AdaptorS", "AdaptorT", "default_offsets"]
