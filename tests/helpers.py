"""Shared test helpers: devices, dtypes, and the accuracy rule every kernel is held to."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Absolute slack of the accuracy rule, relative to the largest reference value.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]
# Every dtype on the CPU; float64 is CPU-only (for gradcheck), CUDA runs float32, float16 and bfloat16.
DEVICE_DTYPES = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in DTYPES] + [
    pytest.param("cuda", dt, marks=CUDA_MARKS, id=f"cuda-{str(dt)[6:]}") for dt in DTYPES if dt != torch.float64
]


def weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """A, D, delta_bias of the scan: float32, float64 with float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    name: str, out: torch.Tensor, ref_same: torch.Tensor, ref_exact: torch.Tensor, dtype: torch.dtype
) -> None:
    """The kernel's error against the float64 reference is at most twice the error of the reference run in
    the kernel's own precision, plus a small slack (the rule flash-attention's tests use)."""
    assert out.shape == ref_exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_exact.shape)}"
    assert out.dtype == ref_same.dtype, f"{name}: dtype {out.dtype} != {ref_same.dtype}"
    if not out.numel():
        return
    scale = max(1.0, ref_exact.abs().max().item())
    err, ref_err = max_error(out, ref_exact), max_error(ref_same, ref_exact)
    bound = 2 * ref_err + ATOL[dtype] * scale
    assert err <= bound, f"{name} ({dtype}): error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


def random_like(t: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """float64 normal values of t's shape on t's device: the same values for a seed on every device."""
    values = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return values.to(t.device)


def interpolate(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """float64 values of `rows` (..., L) at fractional positions `pos` (float32, as the reference computes
    t + offset): linear between the two neighbouring integer positions, 0 outside [0, L - 1]."""
    L = rows.shape[-1]
    lo = torch.floor(pos)
    frac = (pos - lo).double()
    out = torch.zeros((*rows.shape[:-1], *pos.shape), dtype=torch.float64, device=pos.device)
    for index, coef in ((lo, 1 - frac), (lo + 1, frac)):
        inside = (index >= 0) & (index <= L - 1)
        out += torch.where(inside, coef * rows[..., index.long().clamp(0, L - 1)].double(), 0.0)
    return out


def layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of t with its sizes, strides and storage offset: a view with gaps stays one (its gaps
    NaN, so that a kernel reading them fails its test), an expanded dimension stays expanded (stride 0).
    (Tensor.clone makes a view with gaps contiguous.)"""
    t = t.detach()
    core = t
    for dim in range(t.dim()):
        if t.stride(dim) == 0 and t.size(dim) > 1:
            core = core.narrow(dim, 0, 1)
    if core.numel() == 0:
        return t.clone()
    span = 1 + sum((size - 1) * stride for size, stride in zip(core.shape, core.stride()))
    fill = float("nan") if t.is_floating_point() else 0
    storage = torch.full((core.storage_offset() + span,), fill, dtype=t.dtype, device=t.device)
    copy = storage.as_strided(core.shape, core.stride(), core.storage_offset())
    copy.copy_(core)
    return copy.expand(t.shape)


def run_with_grads(fn, inputs: dict[str, torch.Tensor | None], grad_out: torch.Tensor, **kwargs):
    """fn(**inputs, **kwargs) and the gradients of <out, grad_out> for every floating input tensor (zeros for
    those the output does not depend on, as the reference's on empty inputs)."""
    leaves = {k: layout_copy(v).requires_grad_() for k, v in inputs.items() if v is not None}
    out = fn(**{k: leaves.get(k) for k in inputs}, **kwargs)
    if out.requires_grad:
        grads = torch.autograd.grad(
            out, list(leaves.values()), grad_out.to(out.dtype), allow_unused=True, materialize_grads=True
        )
    else:
        grads = [torch.zeros_like(v) for v in leaves.values()]
    return out.detach(), dict(zip(leaves, grads))


def check_against_reference(op, ref, inputs: dict, grad_out: torch.Tensor, dtype: torch.dtype, **kwargs) -> None:
    """Forward and every gradient of `op` against `ref`, by the accuracy rule."""
    out, grads = run_with_grads(op, inputs, grad_out, **kwargs)
    ref_out, ref_grads = run_with_grads(ref, inputs, grad_out, **kwargs)
    exact = {k: None if v is None else v.double() for k, v in inputs.items()}
    exact_out, exact_grads = run_with_grads(ref, exact, grad_out.double(), **kwargs)
    assert_close_to_reference("output", out, ref_out, exact_out, dtype)
    for k in grads:
        assert_close_to_reference(f"grad {k}", grads[k], ref_grads[k], exact_grads[k], dtype)
