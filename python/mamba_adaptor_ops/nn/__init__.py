"""nn.Module building blocks: the adaptors and the Mamba-Adaptor scan blocks built on them (SS2D, Vim)."""

from .adaptors import AdaptorS, AdaptorT, default_offsets
from .ss2d import (
    SS2D,
    AdaptorConfig,
    AdaptorMixer,
    LayerNorm2d,
    Linear2d,
    Mlp2d,
    MultiScan,
    ParallelAdaptor,
    cross_merge,
    cross_scan,
    read_out,
)
from .vim import VimMixer

__all__ = [
    "SS2D",
    "AdaptorConfig",
    "AdaptorMixer",
    "AdaptorS",
    "AdaptorT",
    "LayerNorm2d",
    "Linear2d",
    "Mlp2d",
    "MultiScan",
    "ParallelAdaptor",
    "VimMixer",
    "cross_merge",
    "cross_scan",
    "default_offsets",
    "read_out",
]
