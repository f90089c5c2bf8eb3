"""Typed Python entry points of the ops, with their fake kernels and autograd registrations."""

from .multi_dilation_dwconv2d import multi_dilation_dwconv2d
from .selective_scan import selective_scan
from .state_gather import state_gather

__all__ = ["multi_dilation_dwconv2d", "selective_scan", "state_gather"]
