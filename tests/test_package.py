"""The built package: op registration, the one-wheel (stable ABI + abi3) promise, the CUDA module."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import mamba_adaptor_ops as mao
from mamba_adaptor_ops import _C

OPS = ["selective_scan", "state_gather", "multi_dilation_dwconv2d"]


def extension_modules() -> list[Path]:
    modules = [Path(_C.__file__)]
    if mao.CUDA_KERNELS_LOADED:
        from mamba_adaptor_ops import _C_cuda

        modules.append(Path(_C_cuda.__file__))
    return modules


@pytest.mark.parametrize("op", OPS)
def test_ops_and_backward_ops_registered_with_cpu_kernels(op):
    for name in (op, f"{op}_backward"):
        assert hasattr(torch.ops.mamba_adaptor, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mamba_adaptor::{name}", "CPU")


def test_extensions_use_the_limited_python_api():
    for module in extension_modules():
        assert module.name.endswith(".abi3.so"), module.name


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_extensions_use_only_the_stable_torch_c_shim():
    """Every torch symbol the modules import is a C function of the stable shim (aoti_torch_*, torch_*):
    no C++ symbol of libtorch, whose mangled names change between releases."""
    for module in extension_modules():
        out = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True, text=True, check=True)
        symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
        foreign = [
            s
            for s in symbols
            if not s.startswith(("aoti_torch_", "torch_", "Py", "_ITM_", "__gmon_start__"))
            and "@" not in s  # versioned libc / libstdc++ / libgcc symbols
            and not s.startswith(("_Zn", "_Zd", "_ZS", "_ZT", "__cxa_", "_Unwind_", "__gxx_"))
        ]
        torch_cpp = [s for s in foreign if "c10" in s or "at6" in s or "torch" in s]
        assert not torch_cpp, f"{module.name} imports libtorch C++ symbols: {torch_cpp[:5]}"


def test_cuda_module_loads_where_it_was_built():
    if os.environ.get("MAMBA_ADAPTOR_REQUIRE_CUDA_KERNELS") == "1":
        assert mao.CUDA_KERNELS_BUILT, "MAMBA_ADAPTOR_REQUIRE_CUDA_KERNELS=1 but the CUDA module was not built"
    assert mao.CUDA_KERNELS_LOADED == mao.CUDA_KERNELS_BUILT, mao._library.CUDA_KERNELS_ERROR
    if mao.CUDA_KERNELS_LOADED:
        for op in OPS:
            for name in (op, f"{op}_backward"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mamba_adaptor::{name}", "CUDA"), name
