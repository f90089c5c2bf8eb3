"""VMamba's SS2D with Mamba-Adaptor's adaptors, in both insertion forms (Mamba-Adaptor, CVPR 2025, Fig. 4).

The scan runs in states mode, Adaptor-T strengthens the hidden states, y = C h' + D u is read out, the S
sequences are merged back and Adaptor-S adds spatial locality (Alg. 1). `AdaptorConfig` picks the form and
every ablation choice (Table 5): Adaptor-T static / learnable / absent, the Adaptor-S dilations, and the
width of Adaptor-S's channel projection (see README "Models" for the arithmetic behind the defaults).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import selective_scan
from .adaptors import AdaptorS, AdaptorT

#: Per-form defaults of AdaptorConfig's `kernel_size` and `hidden_ratio` (README "Models" gives the
#: arithmetic): the sequential form (b1, b2) uses 7x7 Adaptor-S kernels and a D -> 3D/8 -> D projection
#: (0.75 D^2 weights per block); the parallel form (booster, transfer) 3x3 kernels and D -> D/6 -> d_model
#: (D^2 / 3), which keeps it near the paper's +3.2% parameters on VMamba-T.
FORM_DEFAULTS: dict[str, dict[str, float]] = {
    "sequential": {"kernel_size": 7, "hidden_ratio": 3 / 8},
    "parallel": {"kernel_size": 3, "hidden_ratio": 1 / 6},
}


@dataclass(frozen=True)
class AdaptorConfig:
    """Where and which adaptors a scan block gets (one row of the paper's Table 5, in one of Fig. 4's forms).

    form: "sequential" (inside the block: h' = Adaptor-T(h) with predicted coefficients phi_c, then
        y + Adaptor-S(y); for training from scratch) or "parallel" (a side branch with weight-sharing
        coefficients whose output projection starts at zero; for adding to a pretrained block).
    positions: Adaptor-T's positions, "learnable" (phi_p) or "static"; None leaves Adaptor-T out.
    num_points: K, the states each h_t aggregates.
    dilations: Adaptor-S's dilation factors (one depthwise kernel each); () leaves Adaptor-S out.
    kernel_size: Adaptor-S's depthwise kernel size (3, 5 or 7); None takes FORM_DEFAULTS[form].
    hidden_ratio: hidden channels of Adaptor-S's projection over D; None takes FORM_DEFAULTS[form].
    """

    form: Literal["sequential", "parallel"] = "sequential"
    positions: Literal["learnable", "static"] | None = "learnable"
    num_points: int = 8
    dilations: tuple[int, ...] = field(default=(1, 2))
    kernel_size: int | None = None
    hidden_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.form not in FORM_DEFAULTS:
            raise ValueError(f"AdaptorConfig: form must be 'sequential' or 'parallel', got {self.form!r}")
        for name, value in FORM_DEFAULTS[self.form].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.positions not in ("learnable", "static", None):
            raise ValueError(
                f"AdaptorConfig: positions must be 'learnable', 'static' or None, got {self.positions!r}"
            )
        if self.num_points < 1:
            raise ValueError(f"AdaptorConfig: num_points must be at least 1, got {self.num_points}")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if any(d < 1 for d in self.dilations):
            raise ValueError(f"AdaptorConfig: dilations must be positive, got {self.dilations}")
        if self.kernel_size not in (3, 5, 7):
            raise ValueError(f"AdaptorConfig: kernel_size must be 3, 5 or 7, got {self.kernel_size}")
        if self.hidden_ratio <= 0:
            raise ValueError(f"AdaptorConfig: hidden_ratio must be positive, got {self.hidden_ratio}")
        if self.form == "sequential" and self.positions is None and not self.dilations:
            raise ValueError("AdaptorConfig: a sequential config without Adaptor-T and Adaptor-S adds nothing; "
                             "pass adaptor=None for the plain block")

    @classmethod
    def make(cls, spec: AdaptorConfig | dict | str | None) -> AdaptorConfig | None:
        """An AdaptorConfig from a config, a dict of its fields, a form name, or None (no adaptors)."""
        if spec is None or isinstance(spec, AdaptorConfig):
            return spec
        if isinstance(spec, str):
            return cls(form=spec)  # type: ignore[arg-type]
        if isinstance(spec, dict):
            return cls(**spec)
        raise TypeError(f"adaptor must be an AdaptorConfig, a dict, a form name or None, got {type(spec).__name__}")

    def hidden_channels(self, dim: int) -> int:
        """Hidden channels of Adaptor-S's projection for a block of D = `dim` channels (at least 1)."""
        return max(1, round(dim * self.hidden_ratio))


class Linear2d(nn.Linear):
    """A linear layer over the channels of a map (VMamba's Linear2d, a 1x1 convolution).

    forward(x): (b, in_features, H, W) -> (b, out_features, H, W), computed as one matrix product over the
    channels-last view (faster than a 1x1 convolution on CPUs; the result is channels-last in memory, which
    the next pointwise layer reads without a copy). The weight keeps nn.Linear's (out_features, in_features)
    shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a map. forward(x): (b, C, H, W) -> (b, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp2d(nn.Module):
    """Two pointwise layers with an activation between: fc2(drop(act(fc1(x)))).

    forward(x): (b, in_features, H, W) -> (b, out_features, H, W).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = Linear2d(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = Linear2d(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def cross_scan(x: Tensor) -> Tensor:
    """VMamba's four-direction unfold: (b, C, H, W) -> (b, 4, C, H*W).

    Sequence 0 reads the map row by row, 1 column by column, 2 and 3 are 0 and 1 reversed.
    """
    rows_cols = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)  # (b, 2, C, L)
    return torch.cat([rows_cols, rows_cols.flip(-1)], dim=1)


def cross_merge(ys: Tensor, H: int, W: int) -> Tensor:
    """The adjoint of `cross_scan`: sums the four sequences back onto the map, (b, 4, C, H*W) -> (b, C, H, W)."""
    b, _, C, _ = ys.shape
    ys = ys[:, :2] + ys[:, 2:].flip(-1)  # (b, 2, C, L): row-major and column-major
    return ys[:, 0].reshape(b, C, H, W) + ys[:, 1].reshape(b, C, W, H).transpose(2, 3)


def read_out(h: Tensor, C: Tensor, u: Tensor | None = None, D: Tensor | None = None) -> Tensor:
    """y = sum_n C_n h_n (+ D u): the scan's output from (adapted) hidden states, computed in float32.

    h: (b, S, D*N, L) states of S sequences of D channels; C: (b, S, N, L); u: (b, S, D, L) and D: (S*D,)
    or both None. Returns (b, S, D, L) in h's dtype (float64 stays float64).
    """
    b, S, DN, L = h.shape
    N = C.shape[2]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    y = torch.einsum("bsdnl,bsnl->bsdl", h.to(acc).view(b, S, DN // N, N, L), C.to(acc))
    if u is not None and D is not None:
        y = y + D.to(acc).view(S, -1, 1) * u.to(acc)
    return y.to(h.dtype)


class AdaptorMixer(nn.Module):
    """Adaptor-S with its channel projection: proj(AdaptorS(x)), proj = fc2(GELU(fc1(.))).

    forward(x): (b, channels, H, W) -> (b, out_channels, H, W). The depthwise convolutions of Adaptor-S (one
    per dilation) see space but no other channel; the projection (channels -> hidden_channels ->
    out_channels) mixes channels. `dilations=()` leaves the depthwise part out. `zero_init` starts fc2 at
    zero, so the module outputs zero until trained (the parallel form's output projection).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2),
        zero_init: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.zero_init = zero_init
        self.spatial = AdaptorS(channels, kernel_size, dilations) if len(dilations) else None
        self.proj = Mlp2d(channels, hidden_channels, out_channels or channels, act_layer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.spatial is not None:
            self.spatial.reset_parameters()
        self.proj.fc1.reset_parameters()
        self.proj.fc2.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.proj.fc2.weight)
            nn.init.zeros_(self.proj.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial is not None:
            x = self.spatial(x)
        return self.proj(x)


class ParallelAdaptor(nn.Module):
    """The parallel form's side branch: Adaptor-T with shared coefficients, Adaptor-S, a zero-initialised
    output projection; added to a (pretrained) block's output, which it leaves unchanged at insertion.

    forward(y, extra): y (b, D, H, W) the block's merged scan output, extra (b, D, H, W) the merged C * sum_k
    c_k h(p_k) of `adaptor_t` (or None without Adaptor-T) -> (b, out_dim, H, W):
    mixer(norm(y + extra)), i.e. Adaptor-S on the adapted output y' = merge(C h' + D u).
    """

    def __init__(self, dim: int, out_dim: int, d_state: int, num_sequences: int, cfg: AdaptorConfig) -> None:
        super().__init__()
        self.adaptor_t = None
        if cfg.positions is not None:
            self.adaptor_t = AdaptorT(
                dim * d_state, cfg.num_points, num_sequences, positions=cfg.positions,
                coefficients="shared", residual=False,
            )
        self.norm = LayerNorm2d(dim)
        self.mixer = AdaptorMixer(
            dim, cfg.hidden_channels(dim), out_dim, cfg.kernel_size, cfg.dilations, zero_init=True
        )

    def forward(self, y: Tensor, extra: Tensor | None) -> Tensor:
        if extra is not None:
            y = y + extra
        return self.mixer(self.norm(y))


class MultiScan(nn.Module):
    """The selective scan of S sequences of `d_inner` channels, with the adaptors it applies.

    Holds VMamba's parameters (names and shapes as in its checkpoints): x_proj_weight (S, R + 2N, D),
    dt_projs_weight (S, D, R), dt_projs_bias (S, D), A_logs (S*D, N), Ds (S*D,), and the adaptors:
    `adaptor_t` and `adaptor_s` (sequential form) or `parallel` (parallel form, output `d_model` channels).
    `scan(xs)` runs xs (b, S, D, L) -> (y (b, S, D, L), states (b, S, D*N, L) or None, C (b, S, N, L)).
    SS2D (S = 4) and the Vim mixer (S = 2) build on it.
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        num_sequences: int,
        d_state: int,
        dt_rank: int,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        if min(d_model, d_inner, d_state, dt_rank) < 1:
            raise ValueError(
                f"{type(self).__name__}: d_model, d_inner, d_state and dt_rank must be positive, got "
                f"{d_model}, {d_inner}, {d_state}, {dt_rank}"
            )
        self.d_model, self.d_inner, self.num_sequences = d_model, d_inner, num_sequences
        self.d_state, self.dt_rank = d_state, dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        S, D, N, R = num_sequences, d_inner, d_state, dt_rank
        self.x_proj_weight = nn.Parameter(torch.empty(S, R + 2 * N, D))
        self.dt_projs_weight = nn.Parameter(torch.empty(S, D, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(S, D))
        self.A_logs = nn.Parameter(torch.empty(S * D, N))
        self.Ds = nn.Parameter(torch.empty(S * D))
        self.adaptor_t: AdaptorT | None = None
        self.adaptor_s: AdaptorMixer | None = None
        self.parallel: ParallelAdaptor | None = None
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: dt = softplus(dt_bias) log-uniform in [dt_min, dt_max], A = -(1..N), D = 1."""
        S, D, N, R = self.num_sequences, self.d_inner, self.d_state, self.dt_rank
        with torch.no_grad():
            bound = D**-0.5
            self.x_proj_weight.uniform_(-bound, bound)
            self.dt_projs_weight.uniform_(-(R**-0.5), R**-0.5)
            log_dt = torch.rand(S, D) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
            dt = log_dt.exp().clamp(min=self.dt_init_floor)
            self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
            self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(S * D, 1))
            self.Ds.fill_(1.0)

    def add_adaptors(self, adaptor: AdaptorConfig | dict | str) -> None:
        """Adds the adaptors `adaptor` describes, on the device and dtype of the block's weights.

        The parallel form leaves the block's output unchanged until its branch is trained; the sequential
        form changes it (Adaptor-T's aggregation and Adaptor-S start non-zero, for training from scratch).
        """
        cfg = AdaptorConfig.make(adaptor)
        if self.adaptor_t is not None or self.adaptor_s is not None or self.parallel is not None:
            raise ValueError(f"{type(self).__name__} already has adaptors; build a fresh block to change them")
        D, N, S = self.d_inner, self.d_state, self.num_sequences
        if cfg.form == "parallel":
            self.parallel = ParallelAdaptor(D, self.d_model, N, S, cfg)
        else:
            if cfg.positions is not None:
                self.adaptor_t = AdaptorT(D * N, cfg.num_points, S, positions=cfg.positions, coefficients="predicted")
            if cfg.dilations:
                self.adaptor_s = AdaptorMixer(D, cfg.hidden_channels(D), D, cfg.kernel_size, cfg.dilations)
        for module in (self.adaptor_t, self.adaptor_s, self.parallel):
            if module is not None:
                module.to(device=self.Ds.device, dtype=self.Ds.dtype)

    def uses_spatial_adaptor(self) -> bool:
        """Whether an Adaptor-S (which needs the H x W map) is present, in either form."""
        return self.adaptor_s is not None or (self.parallel is not None and self.parallel.mixer.spatial is not None)

    def scan(self, xs: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """xs (b, S, D, L) -> (y (b, S, D, L), the states (b, S, D*N, L) when an Adaptor-T needs them else
        None, C (b, S, N, L)); y = C h' + D u with the sequential Adaptor-T, the plain scan otherwise."""
        b, S, D, L = xs.shape
        N, R = self.d_state, self.dt_rank
        x_dbl = torch.einsum("bsdl,scd->bscl", xs, self.x_proj_weight)  # (b, S, R + 2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bsrl,sdr->bsdl", dts, self.dt_projs_weight)  # (b, S, D, L)
        wdtype = torch.float64 if xs.dtype == torch.float64 else torch.float32
        A = -torch.exp(self.A_logs.to(wdtype))  # (S*D, N)
        delta_bias = self.dt_projs_bias.reshape(-1).to(wdtype)  # (S*D,)
        # One dtype for the scan's inputs: under autocast the projections may come out wider than xs.
        Bs, Cs = Bs.to(xs.dtype), Cs.to(xs.dtype)
        u, delta = xs.reshape(b, S * D, L), dts.to(xs.dtype).reshape(b, S * D, L)
        need_states = self.adaptor_t is not None or (self.parallel is not None and self.parallel.adaptor_t is not None)
        if not need_states:
            y = selective_scan(u, delta, A, Bs, Cs, self.Ds.to(wdtype), delta_bias, True)
            return y.view(b, S, D, L), None, Cs
        states = selective_scan(u, delta, A, Bs, None, None, delta_bias, True).view(b, S, D * N, L)
        adapted = self.adaptor_t(states) if self.adaptor_t is not None else states  # h' (sequential form)
        return read_out(adapted, Cs, xs, self.Ds), states, Cs

    def parallel_extra(self, states: Tensor | None, C: Tensor) -> Tensor | None:
        """The parallel branch's C * sum_k c_k h(p_k), (b, S, D, L), before merging; None without Adaptor-T."""
        if self.parallel is None or self.parallel.adaptor_t is None or states is None:
            return None
        return read_out(self.parallel.adaptor_t(states), C)


class SS2D(MultiScan):
    """VMamba's 2D selective scan (the v05_noz block: no gate) with optional Mamba-Adaptor adaptors.

    forward(x): (b, d_model, H, W) -> (b, d_model, H, W). in_proj (1x1) -> 3x3 depthwise conv -> SiLU ->
    four-direction cross-scan -> selective scan (S = 4 sequences of D = ssm_ratio * d_model channels, d_state
    N) -> [Adaptor-T on the states, y = C h' + D u] -> cross-merge -> [y + Adaptor-S(y)] -> LayerNorm ->
    out_proj (1x1) [+ the parallel branch]. `adaptor` (an AdaptorConfig, its fields as a dict, or None)
    chooses the adaptors; `add_adaptors` adds them to a built block.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | Literal["auto"] = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        act_layer: type[nn.Module] = nn.SiLU,
        adaptor: AdaptorConfig | dict | None = None,
        **dt_init: float,
    ) -> None:
        d_inner = int(ssm_ratio * d_model)
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        super().__init__(d_model, d_inner, 4, d_state, rank, **dt_init)
        self.in_proj = Linear2d(d_model, d_inner, bias=False)
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
            if d_conv > 1
            else nn.Identity()
        )
        self.act = act_layer()
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = Linear2d(d_inner, d_model, bias=False)
        cfg = AdaptorConfig.make(adaptor)
        if cfg is not None:
            self.add_adaptors(cfg)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[2:]
        # (b, D, H, W) in NCHW strides (also for 1 x 1 maps, whose strides contiguous() leaves ambiguous): the
        # scan reads its rows, and the depthwise weight's gradient gets the layout DDP's buckets expect.
        x = self.act(self.conv2d(self.in_proj(x).clone(memory_format=torch.contiguous_format)))
        y, states, C = self.scan(cross_scan(x))  # y (b, 4, D, L)
        y = cross_merge(y, H, W)  # (b, D, H, W)
        if self.adaptor_s is not None:
            y = y + self.adaptor_s(y)
        out = self.out_proj(self.out_norm(y))
        if self.parallel is not None:
            extra = self.parallel_extra(states, C)
            out = out + self.parallel(y, None if extra is None else cross_merge(extra, H, W))
        return out

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}"
        )


__all__ = [
    "AdaptorConfig",
    "AdaptorMixer",
    "LayerNorm2d",
    "Linear2d",
    "Mlp2d",
    "MultiScan",
    "ParallelAdaptor",
    "SS2D",
    "cross_merge",
    "cross_scan",
    "read_out",
]
