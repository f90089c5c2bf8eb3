"""CUDA-only checks of state_gather (Adaptor-T) and multi_dilation_dwconv2d (Adaptor-S) beyond the shared
device-parametrised tests: the deterministic backward, float64 refusal, > 2^31-element tensors, the tiled and
direct kernel paths, shapes near the shared memory per block, channels_last with odd C, a non-default stream
and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

import mamba_adaptor_ops as mao
from helpers import check_against_reference, interpolate, random_like
from mamba_adaptor_ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gather_inputs(b, S, D, L, K, dtype=torch.float32, spread=4.0, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to("cuda", dtype)

    offsets = rand(b, S, K, L, scale=spread)
    offsets.view(-1)[::7] = offsets.view(-1)[::7].round()
    return dict(h=rand(b, S, D, L), offsets=offsets, weights=torch.softmax(rand(b, S, K, L), dim=2))


def conv_inputs(b, C, H, W, k=3, n_dilations=2, dtype=torch.float32, bias=True, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to("cuda", dtype)

    return dict(x=randn(b, C, H, W), weight=randn(n_dilations, C, k, k) / k, bias=randn(C) if bias else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [3136, 5000])  # one staged row; tiles with halos (L > 3584)
def test_gather_deterministic_backward_is_bit_identical(dtype, L):
    inputs = gather_inputs(2, 4, 40, L, 4, dtype, spread=3.0)
    grad = torch.randn(inputs["h"].shape, device="cuda", dtype=dtype)
    backward = torch.ops.mamba_adaptor.state_gather_backward
    runs = [backward(grad, *inputs.values(), True, True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], backward(grad, *inputs.values(), True, False)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "b,S,D,L,K,spread",
    [
        (1, 2, 17, 3137, 3, 6.0),  # odd L: staging one element per load; a short last row chunk
        (1, 2, 17, 4100, 3, 40.0),  # L % 8 == 4: 8-byte staging loads for 16-bit types, in tiles with halos
        (8, 4, 521, 24, 4, 8.0),  # short rows: forward and grad_h blocks of several row chunks (GPUs of <= ~250 SMs)
        (1, 1, 9, 5000, 2, 900.0),  # tiles with halos, many samples outside the staged window
        (2, 1, 3, 40, 9, 30.0),  # more points than one register group of the grad_offsets kernel
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_kernel_paths(b, S, D, L, K, spread, dtype):
    inputs = gather_inputs(b, S, D, L, K, dtype, spread=spread)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, random_like(inputs["h"]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [3200, 4096])
def test_gather_long_rows_within_the_device_shared_memory(dtype, L):
    """The staged windows and the bucket cursors follow the device's shared memory per block: L = 3200 is one
    window on sm_80 / sm_90 (163 / 227 KiB) but tiles on sm_86 / sm_89 / sm_120 (99 KiB), and L = 4096 tiles
    on every device. Forward and backward against the reference."""
    inputs = gather_inputs(1, 2, 17, L, 3, dtype, spread=300.0)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, random_like(inputs["h"]), dtype)


def test_float64_on_cuda_raises_a_clear_error():
    inputs = {k: v.double() for k, v in gather_inputs(1, 1, 2, 5, 1).items()}
    message = r"float64 runs on the CPU only; use float32, float16 or bfloat16 on CUDA"
    with pytest.raises(RuntimeError, match=r"state_gather: " + message):
        mao.state_gather(**inputs)
    with pytest.raises(RuntimeError, match=r"state_gather_backward: " + message):
        torch.ops.mamba_adaptor.state_gather_backward(inputs["h"], *inputs.values(), True, False)
    conv = {k: v.double() for k, v in conv_inputs(1, 2, 4, 4).items()}
    with pytest.raises(RuntimeError, match=r"multi_dilation_dwconv2d: " + message):
        mao.multi_dilation_dwconv2d(**conv)
    with pytest.raises(RuntimeError, match=r"multi_dilation_dwconv2d_backward: " + message):
        torch.ops.mamba_adaptor.multi_dilation_dwconv2d_backward(conv["x"], *conv.values(), [1, 2])


def test_gather_more_than_2_pow_31_elements():
    """h with > 2^31 elements (L = 2^24 - 1, the longest CUDA row; the last chunk of 16 rows that a block stages
    starts past 2^31): forward and backward checked at samples. Positions are float32 like the reference's, so
    the expected values round them the same way."""
    D, L, K = 145, 2**24 - 1, 2
    assert (D - 1) // 16 * 16 * L > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1, 1, D, L, device="cuda", dtype=torch.bfloat16, generator=gen)
    shifts = torch.tensor(
        [-2.75, 1.25], device="cuda"
    )  # one constant shift per point: grad_h is easy to invert
    offsets = shifts.view(1, 1, K, 1).expand(1, 1, K, L).to(torch.bfloat16)
    weights = torch.rand(1, 1, K, L, device="cuda", generator=gen).to(torch.bfloat16)
    rows = torch.tensor([0, 64, D - 1], device="cuda")
    t = torch.cat(
        [
            torch.randint(0, L, (500,), device="cuda", generator=gen),
            torch.tensor([0, 1, L - 2, L - 1], device="cuda"),
        ]
    )

    out = mao.state_gather(h, offsets, weights)
    pos = t.float() + offsets[0, 0, :, t].float()  # (K, n)
    w = weights[0, 0, :, t].double()
    for d in rows.tolist():
        expected = h[0, 0, d, t].double() + (w * interpolate(h[0, 0, d], pos)).sum(0)
        torch.testing.assert_close(out[0, 0, d, t].double(), expected, atol=0.05, rtol=0.02)
    del out

    grad = torch.randn(1, 1, D, L, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad_h, grad_offsets, grad_weights = torch.ops.mamba_adaptor.state_gather_backward(
        grad, h, offsets, weights, True, True
    )
    g = grad[0, 0, :, t].double()  # (D, n)
    for k in range(K):
        v = interpolate(h[0, 0], pos[k])  # (D, n)
        torch.testing.assert_close(grad_weights[0, 0, k, t].double(), (g * v).sum(0), atol=0.3, rtol=0.02)
    # Targets below 2^20, where t + shift is exact: sources t - floor(shift) (coef 1 - frac), t - floor(shift) - 1 (frac).
    i = t[t < 2**20]
    expected = grad[0, 0, :, i].double()
    for k, shift in enumerate(shifts.tolist()):
        lo = math.floor(shift)
        frac = shift - lo
        for src, coef in ((i - lo, 1 - frac), (i - lo - 1, frac)):
            valid = (src >= 0) & (src < L)
            s = src.clamp(0, L - 1)
            expected += torch.where(
                valid, coef * weights[0, 0, k, s].double() * grad[0, 0, :, s].double(), 0.0
            )
    torch.testing.assert_close(grad_h[0, 0, :, i].double(), expected, atol=0.05, rtol=0.02)


def check_conv(inputs: dict, dtype: torch.dtype, dilations: tuple[int, ...], channels_last: bool = False) -> None:
    """multi_dilation_dwconv2d forward and backward against the reference, x in NCHW or channels_last."""
    if channels_last:
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, random_like(inputs["x"]),
        dtype, dilations=dilations,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [7, 37])  # odd channel counts: a partial channel word and block
def test_conv_channels_last_odd_channels(dtype, C):
    check_conv(conv_inputs(2, C, 19, 23, dtype=dtype), dtype, (1, 2), channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_large_plane(channels_last):
    """A plane of many tiles (partial tiles at both edges), fwd and bwd against the reference."""
    inputs = conv_inputs(1, 5, 1500, 1700, k=5, n_dilations=3, dtype=torch.bfloat16)
    check_conv(inputs, torch.bfloat16, (1, 2, 3), channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dilations", [(1, 3), (1, 7)])
def test_conv_k7_within_the_device_shared_memory(dilations, dtype, channels_last):
    """k = 7, where blocks come near the shared memory per block: (1, 3) channels_last float32 stages 97 KiB
    of tile and weights; (1, 7) NCHW gives the weight gradient a 44 KiB tile besides its 7 KiB of static
    scratch, past the default 48 KiB. Forward and backward against the reference."""
    check_conv(conv_inputs(2, 40, 70, 70, k=7, n_dilations=2, dtype=dtype), dtype, dilations, channels_last)


def test_conv_more_than_2_pow_31_elements():
    """x with > 2^31 elements (the last channel's plane starts past 2^31): the forward checked on an interior
    patch and on the corner patch."""
    C, H, W, r = 3, 33000, 33000, 2  # k = 3, dilations (1, 2): halo 2
    assert (C - 1) * H * W > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, C, H, W, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(2, C, 3, 3, device="cuda", dtype=torch.bfloat16, generator=gen) / 3
    out = mao.multi_dilation_dwconv2d(x, weight, None, (1, 2))
    for y0, x0 in [(H - 300, W - 200), (0, 0)]:
        ys, xs = max(0, y0 - r), max(0, x0 - r)
        patch = reference.multi_dilation_dwconv2d(
            x[..., ys : y0 + 100 + r, xs : x0 + 100 + r].float(), weight.float(), None, (1, 2)
        )
        expected = patch[..., y0 - ys : y0 - ys + 100, x0 - xs : x0 - xs + 100]
        torch.testing.assert_close(
            out[..., y0 : y0 + 100, x0 : x0 + 100].float(), expected, atol=0.05, rtol=0.02
        )


def test_conv_direct_path_for_huge_dilations():
    """A halo beyond the shared-memory tile (r * dilation > 1024) takes the direct kernels."""
    check_conv(conv_inputs(2, 3, 50, 1200, k=7, n_dilations=2), torch.float32, (1, 400))


def test_conv_backward_is_bit_identical():
    inputs = conv_inputs(4, 96, 56, 56, dtype=torch.bfloat16)
    grad = torch.randn_like(inputs["x"])
    backward = torch.ops.mamba_adaptor.multi_dilation_dwconv2d_backward
    runs = [backward(grad, *inputs.values(), [1, 2]) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_non_default_stream():
    """Inputs written on a side stream right before the ops: the kernels must run on torch's current stream."""
    gather = gather_inputs(2, 4, 32, 3136, 4, torch.bfloat16)
    conv = conv_inputs(8, 96, 56, 56, dtype=torch.bfloat16)
    expected_gather = mao.state_gather(**gather)
    expected_conv = mao.multi_dilation_dwconv2d(**conv)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = gather["h"] * 1  # written on the side stream
        x = conv["x"] * 1
        out_gather = mao.state_gather(h, gather["offsets"], gather["weights"])
        out_conv = mao.multi_dilation_dwconv2d(x, conv["weight"], conv["bias"])
        grads = torch.ops.mamba_adaptor.state_gather_backward(
            out_gather, h, gather["offsets"], gather["weights"], True, True
        )
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out_gather, expected_gather)
    assert torch.equal(out_conv, expected_conv)
    reference_grads = torch.ops.mamba_adaptor.state_gather_backward(
        expected_gather, gather["h"], gather["offsets"], gather["weights"], True, True
    )
    for a, b in zip(grads, reference_grads):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_through_both_ops():
    b, S, D, H, W, K = 2, 4, 8, 14, 14, 4

    def block(h, offsets, weights, conv_weight):
        y = mao.state_gather(h, offsets, weights)
        return mao.multi_dilation_dwconv2d(y.reshape(b, S * D, H, W), conv_weight, None, (1, 2)).sum()

    inputs = gather_inputs(b, S, D, H * W, K)
    conv_weight = torch.randn(2, S * D, 3, 3, device="cuda") / 3
    leaves = [v.clone().requires_grad_() for v in (*inputs.values(), conv_weight)]
    eager = block(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(block, fullgraph=True)(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, a)
