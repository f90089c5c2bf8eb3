"""multi_dilation_dwconv2d (Adaptor-S) against the sum of torch conv2d calls: dtypes, layouts, kernel sizes,
dilations, fwd/bwd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_adaptor_ops as mao
from helpers import DEVICE_DTYPES, DEVICES, check_against_reference, random_like
from mamba_adaptor_ops import reference


def make_inputs(b=2, C=6, H=13, W=11, k=3, n_dilations=2, dtype=torch.float32, device="cpu", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    return dict(x=randn(b, C, H, W), weight=randn(n_dilations, C, k, k) / k, bias=randn(C) if bias else None)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_reference(device, dtype, channels_last):
    inputs = make_inputs(dtype=dtype, device=device)
    if channels_last:
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, random_like(inputs["x"]),
        dtype, dilations=(1, 2),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("dilations", [(1,), (1, 2), (1, 2, 3), (2, 5), (3, 1, 4, 2)])
def test_kernel_sizes_and_dilations(device, k, dilations):
    inputs = make_inputs(b=1, C=3, H=12, W=9, k=k, n_dilations=len(dilations), device=device)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, random_like(inputs["x"]),
        torch.float32, dilations=dilations,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,C,H,W", [(1, 1, 1, 1), (1, 2, 1, 7), (2, 3, 5, 1), (1, 1, 2, 2), (3, 5, 8, 3)])
def test_tiny_and_odd_planes(device, b, C, H, W):
    """Planes smaller than the kernel and its dilation: most taps read padding."""
    inputs = make_inputs(b=b, C=C, H=H, W=W, k=5, device=device)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, random_like(inputs["x"]),
        torch.float32, dilations=(1, 3),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_and_no_bias(device):
    base = make_inputs(b=2, C=8, H=20, W=18, bias=False, device=device)
    inputs = dict(x=base["x"][:, ::2, 1:, ::3], weight=base["weight"][:, ::2], bias=None)
    assert not inputs["x"].is_contiguous() and not inputs["weight"].is_contiguous()
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, random_like(inputs["x"]),
        torch.float32, dilations=(1, 2),
    )


@pytest.mark.parametrize("dtype,exponents", [(torch.float16, (-26, 13)), (torch.bfloat16, (-132, 120))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_16bit_outputs_round_like_torch(dtype, exponents, layout):
    """With one non-zero tap the output is x * w in float32, rounded once to the 16-bit type: bit for bit what
    torch gives, over the type's whole range (subnormal and overflowing results, ties). Zeros may differ in
    sign: the kernel adds x * w to +0."""
    gen = torch.Generator().manual_seed(3)
    C, H, W = 16, 5, 43  # rows of 43: the vector conversions and their scalar tails
    scale = torch.exp2(torch.randint(*exponents, (2, C, H, 2 * W), generator=gen).double())
    x = (torch.randn(2, C, H, 2 * W, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = torch.zeros(1, C, 3, 3, dtype=dtype)
    weight[0, :, 1, 1] = (torch.rand(C, generator=gen) * 4 - 2).to(dtype)
    x = {"nchw": x[..., :W], "channels_last": to_channels_last(x[..., :W]), "strided": x[..., ::2]}[layout]
    out = mao.multi_dilation_dwconv2d(x, weight, None, (1,))
    expected = (x.float() * weight[0, :, 1, 1].float().view(C, 1, 1)).to(dtype)
    same = (out.view(torch.int16) == expected.view(torch.int16)) | ((out == 0) & (expected == 0))
    assert same.all(), f"{(~same).sum().item()} outputs differ, e.g. {out[~same][:4]} != {expected[~same][:4]}"


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last)


# The CPU kernels' channels-last path (x, grad_out and the outputs with channel stride 1): C a multiple of 16
# in float32/float64 reads and writes rows in place, other C and dtypes go through converted, padded rows.
CHANNELS_LAST_CASES = [
    # b, C, H, W, k, dilations, bias, dtype
    (2, 48, 20, 17, 3, (1, 2), True, torch.float32),  # rows in place, several row bands
    (1, 16, 9, 11, 5, (1, 3), True, torch.float64),
    (2, 20, 10, 9, 3, (1, 2), True, torch.float32),  # C not a multiple of 16 (nor of 8)
    (1, 2, 6, 7, 3, (2, 1), False, torch.float32),
    (3, 32, 17, 5, 7, (1, 2), False, torch.float32),  # k = 7, no bias, batch 3
    (1, 16, 3, 2, 7, (1, 3), True, torch.float32),  # plane smaller than the halo
    (2, 24, 4, 5, 5, (6, 1, 9), True, torch.float32),  # dilations larger than the plane
    (1, 16, 1, 1, 3, (1,), True, torch.float32),
    (2, 32, 11, 13, 3, (1, 2), True, torch.float16),
    (2, 40, 11, 13, 5, (1, 2), True, torch.bfloat16),
]


@pytest.mark.parametrize("b,C,H,W,k,dilations,bias,dtype", CHANNELS_LAST_CASES)
def test_channels_last_cpu(b, C, H, W, k, dilations, bias, dtype):
    inputs = make_inputs(b, C, H, W, k, len(dilations), dtype, bias=bias)
    inputs["x"] = to_channels_last(inputs["x"])
    grad = to_channels_last(random_like(inputs["x"]))
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad, dtype, dilations=dilations
    )


def test_channels_last_views_cpu():
    """Channel stride 1 but gaps between pixels or rows: a channel slice and a column-strided view."""
    base = make_inputs(b=2, C=40, H=12, W=16, k=5)
    x = to_channels_last(base["x"])
    for view, weight, bias in [
        (x[:, 4:36], base["weight"][:, 4:36], base["bias"][4:36]),
        (x[:, :32, 1:, ::2], base["weight"][:, :32], None),
    ]:
        assert view.stride(1) == 1 and not view.is_contiguous(memory_format=torch.channels_last)
        inputs = dict(x=view, weight=weight, bias=bias)
        grad = to_channels_last(random_like(view))
        check_against_reference(
            mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad, torch.float32,
            dilations=(1, 2),
        )


def test_channels_last_mixed_layouts_cpu():
    """A channels_last x with an NCHW grad_out, and the reverse (the backward then takes the plane path)."""
    inputs = make_inputs(b=2, C=16, H=9, W=10)
    nchw_x, nchw_grad = inputs["x"], random_like(inputs["x"])
    for x, grad in [(to_channels_last(nchw_x), nchw_grad), (nchw_x, to_channels_last(nchw_grad))]:
        check_against_reference(
            mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, {**inputs, "x": x}, grad,
            torch.float32, dilations=(1, 2),
        )


@pytest.mark.parametrize("channels_last_input", [False, True], ids=["nchw", "channels_last"])
def test_backward_deterministic_cpu(channels_last_input):
    """grad_weight and grad_bias are sums over the batch and the plane: bit-identical from run to run, and from
    one thread count to another."""
    inputs = make_inputs(b=3, C=48, H=40, W=36)
    x = to_channels_last(inputs["x"]) if channels_last_input else inputs["x"]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)
    op = torch.ops.mamba_adaptor.multi_dilation_dwconv2d_backward
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            runs.append(op(grad, x, inputs["weight"], inputs["bias"], [1, 2]))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            assert torch.equal(got, first)


@pytest.mark.parametrize("device", DEVICES)
def test_output_keeps_memory_format(device):
    inputs = make_inputs(device=device)
    x = inputs["x"].to(memory_format=torch.channels_last).requires_grad_()
    out = mao.multi_dilation_dwconv2d(x, inputs["weight"], inputs["bias"])
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(torch.ones_like(out))
    assert mao.multi_dilation_dwconv2d(**inputs).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_empty(device, channels_last):
    for b, C, H, W in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 16, 4, 0)]:
        inputs = make_inputs(b, C, H, W, device=device)
        if channels_last:
            inputs["x"] = to_channels_last(inputs["x"])
        inputs = {k: v.requires_grad_() for k, v in inputs.items()}
        out = mao.multi_dilation_dwconv2d(**inputs)
        assert out.shape == (b, C, H, W)
        out.sum().backward()
        assert torch.count_nonzero(inputs["weight"].grad) == 0


def test_gradcheck_float64():
    inputs = make_inputs(b=2, C=2, H=6, W=5, dtype=torch.float64)
    leaves = tuple(v.requires_grad_() for v in inputs.values())
    assert torch.autograd.gradcheck(lambda x, w, b: mao.multi_dilation_dwconv2d(x, w, b, (1, 2)), leaves)
    cl = inputs["x"].detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: mao.multi_dilation_dwconv2d(x, w, None, (2, 1)), (cl, leaves[1]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    inputs = make_inputs(b=2, C=3, H=7, W=6)
    if channels_last:
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    args = tuple(v.requires_grad_() for v in inputs.values())
    torch.library.opcheck(torch.ops.mamba_adaptor.multi_dilation_dwconv2d.default, (*args, [1, 2]))
    torch.library.opcheck(
        torch.ops.mamba_adaptor.multi_dilation_dwconv2d_backward.default,
        (torch.randn_like(args[0]), *(a.detach() for a in args), [1, 2]),
    )


@settings(max_examples=100, deadline=None)
@given(
    b=st.integers(1, 2),
    C=st.sampled_from([1, 2, 3, 4, 16, 18]),  # 16: the CPU channels-last path's in-place rows
    H=st.integers(1, 12),
    W=st.integers(1, 12),
    k=st.sampled_from([3, 5, 7]),
    dilations=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    bias=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_float64(b, C, H, W, k, dilations, bias, channels_last, seed):
    inputs = make_inputs(b, C, H, W, k, len(dilations), torch.float64, bias=bias, seed=seed)
    grad = random_like(inputs["x"], seed)
    if channels_last:
        inputs["x"], grad = to_channels_last(inputs["x"]), to_channels_last(grad)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad, torch.float64,
        dilations=tuple(dilations),
    )


BAD_INPUTS = [
    ("x rank", dict(x=lambda a: a["x"][0]), None, r"multi_dilation_dwconv2d: expected `x` to be a 4-D tensor \(b, C, H, W\)"),
    ("x dtype", dict(x=lambda a: a["x"].int()), None, r"`x` to have dtype .* but got torch.int32"),
    ("weight rank", dict(weight=lambda a: a["weight"][0]), None, r"`weight` to be a 4-D tensor \(len\(dilations\), C, k, k\)"),
    ("even k", dict(weight=lambda a: a["weight"][..., :2, :2]), None, r"kernel size k in \{3, 5, 7\}, but got shape \(2, 6, 2, 2\)"),
    ("k too large", dict(weight=lambda a: torch.zeros(2, 6, 9, 9)), None, r"kernel size k in \{3, 5, 7\}"),
    ("non-square", dict(weight=lambda a: a["weight"][..., :1, :]), None, r"`weight` to have shape \(len\(dilations\), C, k, k\) = \(2, 6, 3, 3\), but got \(2, 6, 1, 3\)"),
    ("weight channels", dict(weight=lambda a: a["weight"][:, :5]), None, r"= \(2, 6, 3, 3\), but got \(2, 5, 3, 3\)"),
    ("count mismatch", {}, (1, 2, 3), r"= \(3, 6, 3, 3\), but got \(2, 6, 3, 3\)"),
    ("weight dtype", dict(weight=lambda a: a["weight"].double()), None, r"`weight` to have dtype torch.float32 \(the dtype of x\)"),
    ("bias shape", dict(bias=lambda a: a["bias"][:2]), None, r"`bias` to have shape \(C,\) = \(6,\), but got \(2,\)"),
    ("bias dtype", dict(bias=lambda a: a["bias"].half()), None, r"`bias` to have dtype torch.float32"),
    ("zero dilation", {}, (1, 0), r"every dilation >= 1, but got dilations\[1\] = 0"),
    ("negative dilation", {}, (-2, 1), r"every dilation >= 1, but got dilations\[0\] = -2"),
    ("no dilation", dict(weight=lambda a: a["weight"][:0]), (), r"at least one dilation, but got an empty list"),
    ("too many dilations", dict(weight=lambda a: torch.zeros(17, 6, 3, 3)), tuple(range(1, 18)), r"at most 16 dilations, but got 17"),
]


@pytest.mark.parametrize("name,changes,dilations,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, changes, dilations, message):
    inputs = make_inputs()
    inputs.update({key: change(inputs) for key, change in changes.items()})
    with pytest.raises(RuntimeError, match=message):
        mao.multi_dilation_dwconv2d(**inputs, dilations=(1, 2) if dilations is None else dilations)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise():
    inputs = make_inputs(device="cuda")
    inputs["bias"] = inputs["bias"].cpu()
    with pytest.raises(RuntimeError, match=r"expected `bias` on the device of `x` \(cuda:0\), but got cpu"):
        mao.multi_dilation_dwconv2d(**inputs)
