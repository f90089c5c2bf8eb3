"""multi_dilation_dwconv2d (Adaptor-S) against the sum of torch conv2d calls: dtypes, layouts, kernel sizes,
dilations, fwd/bwd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_adaptor_ops as mao
from helpers import DEVICE_DTYPES, DEVICES, check_against_reference
from mamba_adaptor_ops import reference


def make_inputs(b=2, C=6, H=13, W=11, k=3, n_dilations=2, dtype=torch.float32, device="cpu", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    return dict(x=randn(b, C, H, W), weight=randn(n_dilations, C, k, k) / k, bias=randn(C) if bias else None)


def grad_for(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.device)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_reference(device, dtype, channels_last):
    inputs = make_inputs(dtype=dtype, device=device)
    if channels_last:
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad_for(inputs["x"]), dtype,
        dilations=(1, 2),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("dilations", [(1,), (1, 2), (1, 2, 3), (2, 5), (3, 1, 4, 2)])
def test_kernel_sizes_and_dilations(device, k, dilations):
    inputs = make_inputs(b=1, C=3, H=12, W=9, k=k, n_dilations=len(dilations), device=device)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad_for(inputs["x"]),
        torch.float32, dilations=dilations,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,C,H,W", [(1, 1, 1, 1), (1, 2, 1, 7), (2, 3, 5, 1), (1, 1, 2, 2), (3, 5, 8, 3)])
def test_tiny_and_odd_planes(device, b, C, H, W):
    """Planes smaller than the kernel and its dilation: most taps read padding."""
    inputs = make_inputs(b=b, C=C, H=H, W=W, k=5, device=device)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad_for(inputs["x"]),
        torch.float32, dilations=(1, 3),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_and_no_bias(device):
    base = make_inputs(b=2, C=8, H=20, W=18, bias=False, device=device)
    inputs = dict(x=base["x"][:, ::2, 1:, ::3], weight=base["weight"][:, ::2], bias=None)
    assert not inputs["x"].is_contiguous() and not inputs["weight"].is_contiguous()
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad_for(inputs["x"]),
        torch.float32, dilations=(1, 2),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_output_keeps_memory_format(device):
    inputs = make_inputs(device=device)
    x = inputs["x"].to(memory_format=torch.channels_last).requires_grad_()
    out = mao.multi_dilation_dwconv2d(x, inputs["weight"], inputs["bias"])
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(torch.ones_like(out))
    assert mao.multi_dilation_dwconv2d(**inputs).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for b, C, H, W in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)]:
        inputs = {k: v.requires_grad_() for k, v in make_inputs(b, C, H, W, device=device).items()}
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
    C=st.integers(1, 4),
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
    if channels_last:
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    check_against_reference(
        mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, inputs, grad_for(inputs["x"], seed),
        torch.float64, dilations=tuple(dilations),
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
