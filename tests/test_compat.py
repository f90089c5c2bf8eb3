"""mamba_adaptor_ops.compat.selective_scan_fn against mamba_ssm's semantics, written out here on the reference
(and against mamba_ssm itself where it is installed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICES, assert_close_to_reference, weight_dtype
from mamba_adaptor_ops import reference
from mamba_adaptor_ops.compat import selective_scan_fn
from mamba_adaptor_ops.ops.selective_scan import checkpoint_segment


def inputs(device, dtype, b=2, dim=6, N=2, L=300, B_shape="bgnl", G=2, z=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    wdtype = weight_dtype(dtype)

    def rand(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dt)

    BC_shape = {"bnl": (b, N, L), "bgnl": (b, G, N, L), "dn": (dim, N)}[B_shape]
    BC_dtype = wdtype if B_shape == "dn" else dtype  # mamba_ssm: time-invariant B, C in the weights' dtype
    return dict(
        u=rand(b, dim, L), delta=rand(b, dim, L, scale=0.5), A=rand(dim, N, dt=wdtype, scale=0.3, shift=-0.8),
        B=rand(*BC_shape, dt=BC_dtype), C=rand(*BC_shape, dt=BC_dtype), D=rand(dim, dt=wdtype),
        z=rand(b, dim, L) if z else None, delta_bias=rand(dim, dt=wdtype, scale=0.1),
    )


def mamba_semantics(x: dict, delta_softplus: bool, acc: torch.dtype, out_dtype: torch.dtype):
    """mamba_ssm's selective_scan_ref on the reference: (y, last_state) computed in `acc`."""
    b, dim, L = x["u"].shape

    def grouped(t):  # (b, G, N, L) in acc
        if t.dim() == 2:  # rounded to u's dtype, which the scan's B and C share (mamba_ssm keeps them float32)
            return t.to(x["u"].dtype).to(acc)[None, :, :, None].expand(b, dim, t.shape[1], L)
        return t.to(acc).unsqueeze(1) if t.dim() == 3 else t.to(acc)

    args = {k: (v.to(acc) if v is not None else None) for k, v in x.items()}
    B, C = grouped(x["B"]), grouped(x["C"])
    states = reference.selective_scan(args["u"], args["delta"], args["A"], B, None, None, args["delta_bias"],
                                      delta_softplus)
    y = reference.selective_scan(args["u"], args["delta"], args["A"], B, C, args["D"], args["delta_bias"],
                                 delta_softplus)
    if x["z"] is not None:
        y = y * F.silu(args["z"])
    return y.to(out_dtype), states[..., -1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B_shape, N, L",
    [("bnl", 1, 300), ("bgnl", 2, 300), ("dn", 3, 129), ("bgnl", 1, 513), ("bnl", 2, 256), ("bgnl", 4, 1)],
)
def test_selective_scan_fn_matches_mamba_ssm_semantics(device, dtype, B_shape, N, L):
    x = inputs(device, dtype, N=N, L=L, B_shape=B_shape)
    # The last state is the last checkpoint carried through the tail: these lengths take 0 to 4 checkpoints, tails
    # of 1 to 256 timesteps (one segment: L = 256 in float32, 513 in bfloat16 with N = 1).
    S = checkpoint_segment(dtype, N)
    assert L == 1 or (L - 1) // S in (0, 1, 2, 4)
    y, last = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    y_same, _ = mamba_semantics(x, True, torch.float32, dtype)
    y_exact, last_exact = mamba_semantics(x, True, torch.float64, dtype)
    assert_close_to_reference("y", y, y_same, y_exact.double(), dtype)
    assert last.dtype == torch.float32 and last.shape == (2, 6, N) and last.grad_fn is None
    # The last state is computed in float32 from inputs in `dtype`: against the float64 run on the same inputs.
    torch.testing.assert_close(last.double(), last_exact.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(selective_scan_fn(**x, delta_softplus=True), y)


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_fn_gradients(device):
    x = inputs(device, torch.float64 if device == "cpu" else torch.float32, B_shape="bnl", L=150)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    y, _ = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True)
    grads = torch.autograd.grad(y.sum(), list(leaves.values()))
    y_ref, _ = mamba_semantics(leaves, True, y.dtype, y.dtype)
    ref_grads = torch.autograd.grad(y_ref.sum(), list(leaves.values()))
    for name, got, want in zip(leaves, grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_selective_scan_fn_without_optional_arguments_and_bad_A():
    x = inputs("cpu", torch.float32, z=False, B_shape="bnl", L=40)
    y = selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"])
    y_ref = reference.selective_scan(x["u"], x["delta"], x["A"], x["B"].unsqueeze(1), x["C"].unsqueeze(1))
    torch.testing.assert_close(y, y_ref)
    with pytest.raises(TypeError, match="complex A"):
        selective_scan_fn(x["u"], x["delta"], x["A"].to(torch.complex64), x["B"], x["C"])


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_fn_packed_sequences_start_from_zero(device):
    x = inputs(device, torch.float32, B_shape="bgnl", L=300)
    y, last = selective_scan_fn(**x, delta_softplus=True, return_last_state=True, cu_seqlens=torch.tensor(
        [0, 100, 100, 290, 300]))
    for t0, t1 in [(0, 100), (100, 290), (290, 300)]:
        piece = {k: v[..., t0:t1] if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
        y_ref, last_ref = mamba_semantics(piece, True, torch.float64, torch.float64)
        torch.testing.assert_close(y[..., t0:t1].double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        selective_scan_fn(**x, cu_seqlens=torch.tensor([0, 200, 100, 300]))


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_fn_agrees_with_mamba_ssm(device):
    mamba = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    impl = mamba.selective_scan_fn if device == "cuda" else mamba.selective_scan_ref  # its CUDA kernel, its reference
    x = inputs(device, torch.float32, B_shape="bgnl", N=4, L=700)
    y, last = selective_scan_fn(**x, delta_softplus=True, return_last_state=True)
    y_m, last_m = impl(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, last_m.float(), rtol=1e-4, atol=1e-4)
