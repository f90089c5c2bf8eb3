"""mamba-adaptor-ops: fast PyTorch ops for Mamba-Adaptor (CVPR 2025).

Three ops, registered under ``torch.ops.mamba_adaptor`` with CPU and CUDA kernels, fake kernels and autograd:
``selective_scan`` (the Mamba scan, with a states mode), ``state_gather`` (Adaptor-T) and
``multi_dilation_dwconv2d`` (Adaptor-S). ``reference`` holds their plain-PyTorch definitions, ``nn`` the
modules built on them, ``compat`` mamba_ssm's ``selective_scan_fn`` on these kernels; ``python -m
mamba_adaptor_ops`` reports on the install and self-tests it.
"""

from . import flops, reference  # noqa: F401  (importing flops registers the ops' FLOP formulas)
from ._library import CUDA_KERNELS_BUILT, CUDA_KERNELS_LOADED
from .nn import AdaptorS, AdaptorT
from .ops import multi_dilation_dwconv2d, selective_scan, state_gather

__version__ = "0.1.0"

__all__ = [
    "CUDA_KERNELS_BUILT",
    "CUDA_KERNELS_LOADED",
    "AdaptorS",
    "AdaptorT",
    "multi_dilation_dwconv2d",
    "reference",
    "selective_scan",
    "state_gather",
]
