"""Loads the compiled kernels: _C (op schemas + CPU) always, _C_cuda where it was built and can load."""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch  # noqa: F401  (libtorch_cpu must be loaded before the extension modules)

from . import _C  # noqa: F401  (registers torch.ops.mamba_adaptor.* and the CPU kernels)

# The CPU kernels' widest vector build ("default", "avx2", "avx512"); the C++ side reads it, inside parallel
# regions whose errors lose their message, so a bad value is rejected here.
_CPU_CAPABILITY = os.environ.get("MAMBA_ADAPTOR_CPU_CAPABILITY", "")
if _CPU_CAPABILITY not in ("", "default", "avx2", "avx512"):
    raise ValueError(
        f'MAMBA_ADAPTOR_CPU_CAPABILITY: expected "default", "avx2" or "avx512", got "{_CPU_CAPABILITY}"'
    )

#: True when the CUDA kernels were built into this install.
CUDA_KERNELS_BUILT: bool = importlib.util.find_spec(f"{__package__}._C_cuda") is not None
#: Why the CUDA kernels failed to load, or None.
CUDA_KERNELS_ERROR: str | None = None

if CUDA_KERNELS_BUILT:
    try:
        importlib.import_module(f"{__package__}._C_cuda")
    except ImportError as error:  # e.g. a symbol this torch lacks: keep the CPU ops working
        CUDA_KERNELS_ERROR = str(error)
        if os.environ.get("MAMBA_ADAPTOR_REQUIRE_CUDA_KERNELS") == "1":
            raise
        warnings.warn(f"mamba_adaptor_ops: CUDA kernels not loaded, CPU ops only: {error}", stacklevel=2)

#: True when the CUDA kernels are registered with torch.
CUDA_KERNELS_LOADED: bool = CUDA_KERNELS_BUILT and CUDA_KERNELS_ERROR is None
