"""nn.Module building blocks: the adaptors (and, on top of them, the Mamba-Adaptor blocks)."""

from .adaptors import AdaptorS, AdaptorT, default_offsets

__all__ = ["AdaptorS", "AdaptorT", "default_offsets"]
