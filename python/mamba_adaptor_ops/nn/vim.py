"""Vim's bidirectional Mamba mixer with Mamba-Adaptor's adaptors (Mamba-Adaptor, CVPR 2025, Table 7).

Vision Mamba (Vim) scans the patch tokens once forward and once backward: S = 2 sequences. The adaptors are
those of SS2D (`AdaptorConfig`, both forms): Adaptor-T on the two sequences' hidden states, Adaptor-S on the
merged output laid out as the H x W token map.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ss2d import AdaptorConfig, MultiScan


class VimMixer(MultiScan):
    """Vim's bidirectional mixer (bimamba v2) with optional adaptors.

    forward(x, hw=None): tokens x (b, L, d_model) -> (b, L, d_model). in_proj -> (x, z), each D = expand *
    d_model channels; both directions (the tokens and their reverse) through a causal depthwise conv1d and
    SiLU; the selective scan of the S = 2 sequences -> [Adaptor-T on the states, y = C h' + D u] -> merge
    y = (y_fwd + flip(y_bwd)) / 2 -> [y + Adaptor-S(y) on the token map] -> y * SiLU(z) -> out_proj [+ the
    parallel branch]. `hw` = (H, W), H * W = L, row-major tokens, is required when an Adaptor-S is present.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        d_conv: int = 4,
        adaptor: AdaptorConfig | dict | None = None,
        **dt_init: float,
    ) -> None:
        d_inner = expand * d_model
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        super().__init__(d_model, d_inner, 2, d_state, rank, **dt_init)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # One depthwise kernel per channel and direction: (2 * D) channels, causal padding.
        self.conv1d = nn.Conv1d(2 * d_inner, 2 * d_inner, d_conv, padding=d_conv - 1, groups=2 * d_inner)
        self.act = nn.SiLU()
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        cfg = AdaptorConfig.make(adaptor)
        if cfg is not None:
            self.add_adaptors(cfg)

    def _map_size(self, L: int, hw: tuple[int, int] | None) -> tuple[int, int]:
        if hw is None:
            if self.uses_spatial_adaptor():
                raise ValueError("VimMixer: Adaptor-S needs the token map; pass hw=(H, W) with H * W = L")
            return L, 1
        H, W = hw
        if H * W != L:
            raise ValueError(f"VimMixer: hw = {tuple(hw)} holds {H * W} tokens, x holds L = {L}")
        return H, W

    @staticmethod
    def _merge(ys: Tensor) -> Tensor:
        # (b, 2, D, L) -> (b, D, L): the forward sequence plus the backward one put back in order, averaged.
        return (ys[:, 0] + ys[:, 1].flip(-1)) / 2

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        b, L, _ = x.shape
        H, W = self._map_size(L, hw)
        D = self.d_inner
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, L, D) each
        x = x.transpose(1, 2)  # (b, D, L)
        xs = self.act(self.conv1d(torch.cat([x, x.flip(-1)], dim=1))[..., :L])  # (b, 2D, L)
        y, states, C = self.scan(xs.view(b, 2, D, L))  # y (b, 2, D, L)
        y = self._merge(y)  # (b, D, L)
        if self.adaptor_s is not None:
            y = y + self.adaptor_s(y.view(b, D, H, W)).flatten(2)
        out = self.out_proj(y.transpose(1, 2) * F.silu(z))  # (b, L, d_model)
        if self.parallel is not None:
            extra = self.parallel_extra(states, C)
            extra = None if extra is None else self._merge(extra).view(b, D, H, W)
            out = out + self.parallel(y.view(b, D, H, W), extra).flatten(2).transpose(1, 2)
        return out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}"


__all__ = ["VimMixer"]
