"""selective_scan's CUDA kernels: lengths over several segments (tails, row alignments, partial channel tiles),
more than 2^31 elements, L = 65536, torch.compile, the current stream, float64 rejection. Needs a GPU.

tests/test_selective_scan.py runs its CPU tests on CUDA as well (short lengths); these add what only the CUDA
kernels can get wrong: the carries between the 256-timestep forward and 128-timestep backward segments, the
per-block channel tiles, the dB/dC sums across blocks and int64 offsets.
"""

from __future__ import annotations

import pytest
import torch
from test_selective_scan import grad_like, make_inputs

import mamba_adaptor_ops as mao
from helpers import CUDA_MARKS, check_against_reference
from mamba_adaptor_ops import reference

pytestmark = CUDA_MARKS

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"]


def assert_close_scaled(name: str, out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """max |out - ref| <= rel * max(1, max |ref|), compared on the CPU in float64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= rel * scale, f"{name}: error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("L", [129, 1000, 1002, 1003])
@pytest.mark.parametrize(
    "N,G,dim,with_C",
    [(1, 2, 20, True), (16, 4, 8, True), (1, 20, 20, False), (3, 2, 20, False)],
    ids=["N1-10ch", "N16-2ch", "states-N1-1ch", "states-N3-10ch"],
)
def test_multi_segment_matches_reference(dtype, L, N, G, dim, with_C):
    """Several segments with a partial last one; rows 16-, 8-, 4-byte or 2-byte aligned (L = 1000, 1002, 1003);
    groups of 10 channels leave blocks with channel-less warps."""
    inputs = make_inputs(b=2, dim=dim, L=L, N=N, G=G, dtype=dtype, device="cuda", with_C=with_C)
    check_against_reference(
        mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs), dtype, delta_softplus=True
    )


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
def test_multi_segment_without_optional_args(dtype):
    """Without softplus the steps are delta itself, taken >= 0 as softplus would give: negative steps make the
    states grow as exp(|dt A|) over the 777 steps, and with them the error of the GPU's 2-ulp exp2f beyond the
    rule (1.08x in float32, emulated: tests/cuda_emu/emu.h)."""
    inputs = make_inputs(
        b=2, dim=12, L=777, N=2, G=3, dtype=dtype, device="cuda", with_D=False, with_bias=False
    )
    inputs["delta"] = inputs["delta"].abs()
    check_against_reference(mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs), dtype)


def test_non_contiguous_multi_segment():
    b, dim, L, N, G = 2, 6, 1001, 2, 3
    gen = torch.Generator().manual_seed(3)
    inputs = dict(
        u=torch.randn(b, L, dim, generator=gen).cuda().transpose(1, 2),
        delta=torch.rand(b, 2 * dim, L, generator=gen).cuda()[:, ::2],
        A=-torch.rand(N, dim, generator=gen).cuda().t(),
        B=torch.randn(b, N, G, L, generator=gen).cuda().transpose(1, 2),
        C=torch.randn(G, b, N, L, generator=gen).cuda().transpose(0, 1),
        D=torch.randn(2 * dim, generator=gen).cuda()[::2],
        delta_bias=None,
    )
    check_against_reference(
        mao.selective_scan,
        reference.selective_scan,
        inputs,
        grad_like(inputs),
        torch.float32,
        delta_softplus=True,
    )


def cpu_forward_backward(inputs: dict, grad: torch.Tensor, softplus: bool):
    """The CPU kernels in float32 on copies of `inputs`: (output, grads in GRAD_NAMES order)."""
    cpu = {k: None if v is None else v.detach().float().cpu() for k, v in inputs.items()}
    out = torch.ops.mamba_adaptor.selective_scan(*cpu.values(), softplus)
    grads = torch.ops.mamba_adaptor.selective_scan_backward(grad.float().cpu(), *cpu.values(), softplus)
    return out, grads


@pytest.mark.parametrize("N,with_C", [(1, True), (16, True), (4, False)], ids=["N1", "N16", "states-N4"])
def test_length_65536(N, with_C):
    """One long row per channel, against the CPU kernels (themselves held to the reference)."""
    inputs = make_inputs(b=2, dim=4, L=65536, N=N, G=2, dtype=torch.float32, device="cuda", with_C=with_C)
    grad = grad_like(inputs).float()
    out = torch.ops.mamba_adaptor.selective_scan(*inputs.values(), True)
    grads = torch.ops.mamba_adaptor.selective_scan_backward(grad, *inputs.values(), True)
    ref_out, ref_grads = cpu_forward_backward(inputs, grad, True)
    assert_close_scaled("output", out, ref_out, 1e-4)
    for name, g, ref_g in zip(GRAD_NAMES, grads, ref_grads):
        assert (g is None) == (ref_g is None), name
        if g is not None:
            assert_close_scaled(name, g, ref_g, 1e-3)


@pytest.mark.parametrize("states", [False, True], ids=["y", "states"])
def test_more_than_2_31_elements(states):
    """u (1, 32776, 65536), or the states (1, 2056, 16, 65536): 2^31 + 2^19 or 2^31 + 2^23 elements in bfloat16.
    Groups of 8 channels; three groups (the last one past 2^31) are checked against the CPU kernels, forward
    and backward (dB and dC of a group only depend on its channels). About 26 GB of GPU memory."""
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with 48 GB of memory")
    L, per_group = 65536, 8
    dim, N = (2056, 16) if states else (32776, 1)
    G = dim // per_group
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    inputs = dict(
        u=randn(1, dim, L),
        delta=torch.rand(1, dim, L, device="cuda", dtype=torch.bfloat16, generator=gen).sub_(0.5),
        A=-torch.exp(0.5 * randn(dim, N, dtype=torch.float32)),
        B=randn(1, G, N, L),
        C=None if states else randn(1, G, N, L),
        D=None if states else randn(dim, dtype=torch.float32),
        delta_bias=0.5 * randn(dim, dtype=torch.float32),
    )
    out = torch.ops.mamba_adaptor.selective_scan(*inputs.values(), True)
    assert out.numel() > 2**31
    groups = [0, G // 2, G - 1]
    channel_slices = [slice(g * per_group, (g + 1) * per_group) for g in groups]
    outputs = [out[:, s].cpu() for s in channel_slices]
    grad = randn(*out.shape)
    del out
    grads = torch.ops.mamba_adaptor.selective_scan_backward(grad, *inputs.values(), True)
    torch.cuda.synchronize()

    for g, s, out_slice in zip(groups, channel_slices, outputs):
        sliced = dict(
            u=inputs["u"][:, s],
            delta=inputs["delta"][:, s],
            A=inputs["A"][s],
            B=inputs["B"][:, g : g + 1],
            C=None if states else inputs["C"][:, g : g + 1],
            D=None if states else inputs["D"][s],
            delta_bias=inputs["delta_bias"][s],
        )
        ref_out, ref_grads = cpu_forward_backward(sliced, grad[:, s], True)
        assert_close_scaled(f"output of group {g}", out_slice, ref_out, 2e-2)
        full = dict(zip(GRAD_NAMES, grads))
        picked = dict(
            du=full["du"][:, s],
            ddelta=full["ddelta"][:, s],
            dA=full["dA"][s],
            dB=full["dB"][:, g : g + 1],
            dC=None if states else full["dC"][:, g : g + 1],
            dD=None if states else full["dD"][s],
            ddelta_bias=full["ddelta_bias"][s],
        )
        for name, ref_g in zip(GRAD_NAMES, ref_grads):
            assert (picked[name] is None) == (ref_g is None), name
            if ref_g is not None:
                rel = 1e-3 if name in ("dA", "dD", "ddelta_bias") else 2e-2  # float32 sums, bfloat16 tensors
                assert_close_scaled(f"{name} of group {g}", picked[name], ref_g, rel)
    del inputs, grad, grads
    torch.cuda.empty_cache()


def test_compile_fullgraph_on_cuda():
    inputs = make_inputs(b=2, dim=8, L=300, N=2, G=2, dtype=torch.float32, device="cuda")

    def loss(u, delta, A, B, C, D, delta_bias):
        y = mao.selective_scan(u, delta, A, B, C, D, delta_bias, True)
        return (y * y).sum()

    def run(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        value = fn(**leaves)
        return value.detach(), torch.autograd.grad(value, list(leaves.values()))

    eager_value, eager_grads = run(loss)
    value, grads = run(torch.compile(loss, fullgraph=True))
    torch.testing.assert_close(value, eager_value)
    for g, eager_g in zip(grads, eager_grads):
        torch.testing.assert_close(g, eager_g)


def test_float64_raises_clear_error():
    inputs = make_inputs(dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match=r"selective_scan: float64 runs on the CPU only"):
        mao.selective_scan(**inputs)
    with pytest.raises(RuntimeError, match=r"selective_scan_backward: float64 runs on the CPU only"):
        torch.ops.mamba_adaptor.selective_scan_backward(grad_like(inputs), *inputs.values(), False)


def test_runs_on_the_current_stream():
    """Inputs made on a side stream that is kept busy first: a kernel launched on any other stream would read
    them before they exist."""
    base = make_inputs(b=2, dim=8, L=1000, N=4, G=2, dtype=torch.float32, device="cuda")
    grad = grad_like(base).float()
    expected = torch.ops.mamba_adaptor.selective_scan(*base.values(), True)
    expected_grads = torch.ops.mamba_adaptor.selective_scan_backward(grad, *base.values(), True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        inputs = {k: None if v is None else v * 1 for k, v in base.items()}
        side_grad = grad * 1
        out = torch.ops.mamba_adaptor.selective_scan(*inputs.values(), True)
        grads = torch.ops.mamba_adaptor.selective_scan_backward(side_grad, *inputs.values(), True)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected)
    for name, g, expected_g in zip(GRAD_NAMES, grads, expected_grads):
        if expected_g is not None:
            torch.testing.assert_close(g, expected_g, msg=name, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N,with_C", [(1, True), (16, True), (2, False)])
def test_deterministic_backward_is_bit_identical(dtype, N, with_C):
    """Many blocks add to the same dB/dC and dA elements (b=4, 40 channels per group: 5 tiles); without float
    atomics two runs agree bit for bit, and with the atomic backward to rounding."""
    inputs = make_inputs(b=4, dim=80, L=1003, N=N, G=2, dtype=dtype, device="cuda", with_C=with_C)
    grad = grad_like(inputs).to(dtype)
    runs = [
        torch.ops.mamba_adaptor.selective_scan_backward(grad, *inputs.values(), True, deterministic)
        for deterministic in (True, True, False)
    ]
    for name, first, second, atomic in zip(GRAD_NAMES, *runs):
        if first is not None:
            assert torch.equal(first, second), name
            assert_close_scaled(name, first, atomic, 1e-5 if dtype == torch.float32 else 1e-2)
