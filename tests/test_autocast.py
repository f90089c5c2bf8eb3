"""The ops inside torch.autocast: each op's autocast rule (ops/_autocast.py) on the mixed dtypes autocast's own
layers produce, through both entry points (mao.* and torch.ops.mamba_adaptor.*), eager and compiled."""

from __future__ import annotations

import pytest
import torch

import mamba_adaptor_ops as mao
from helpers import DEVICES

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
ops = torch.ops.mamba_adaptor


def scan_inputs(device: str) -> dict:
    """float32 leaves as a model in float32 holds them; under autocast u and B would come out of Linears."""
    g = torch.Generator().manual_seed(0)
    b, dim, N, L = 2, 8, 2, 37

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device).requires_grad_()

    return dict(
        u=leaf(b, dim, L), delta=leaf(b, dim, L, scale=0.5), A=leaf(dim, N, scale=0.3, shift=-1.0),
        B=leaf(b, 2, N, L), C=leaf(b, 2, N, L), D=leaf(dim), delta_bias=leaf(dim, scale=0.1),
    )


def gather_inputs(device: str, D: int = 6, L: int = 29) -> dict:
    g = torch.Generator().manual_seed(1)
    b, S, K = 2, 4, 3
    h = torch.randn(b, S, D, L, generator=g).to(device).requires_grad_()
    offsets = (4 * torch.randn(b, S, K, L, generator=g)).to(device).requires_grad_()
    weights = torch.randn(b, S, K, L, generator=g).to(device).requires_grad_()
    return dict(h=h, offsets=offsets, weights=weights)


def dwconv_inputs(device: str) -> dict:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 9, 11, generator=g).to(device).requires_grad_()
    weight = torch.randn(2, 8, 3, 3, generator=g).to(device).requires_grad_()
    bias = torch.randn(8, generator=g).to(device).requires_grad_()
    return dict(x=x, weight=weight, bias=bias)


def grads(out: torch.Tensor, leaves: dict) -> list[torch.Tensor]:
    """Gradients of a fixed weighted sum of out, in each leaf's dtype."""
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    return list(torch.autograd.grad((out.float() * weights).sum(), list(leaves.values())))


def assert_same(autocast: list[torch.Tensor], manual: list[torch.Tensor]) -> None:
    for a, m in zip(autocast, manual, strict=True):
        assert a.dtype == m.dtype, f"dtype {a.dtype} != {m.dtype}"
        torch.testing.assert_close(a, m, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("direct", [False, True], ids=["mao", "torch.ops"])
def test_selective_scan_runs_its_sequences_in_the_autocast_dtype(device: str, dtype: torch.dtype, direct: bool):
    x = scan_inputs(device)

    def scan(u, delta, A, B, C, D, delta_bias):
        if direct:
            return ops.selective_scan.default(u, delta, A, B, C, D, delta_bias, True, False)
        return mao.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True)

    # u and delta arrive in the autocast dtype (a Linear's output), B and C in float32, A in the autocast dtype.
    with torch.autocast(device, dtype=dtype):
        out = scan(x["u"].to(dtype), x["delta"].to(dtype), x["A"].to(dtype), x["B"], x["C"], x["D"], x["delta_bias"])
    manual = scan(
        x["u"].to(dtype), x["delta"].to(dtype), x["A"].to(dtype).float(), x["B"].to(dtype), x["C"].to(dtype),
        x["D"], x["delta_bias"],
    )
    assert out.dtype == dtype
    assert_same([out, *grads(out, x)], [manual, *grads(manual, x)])


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_states_mode_and_float64_under_autocast(device: str):
    x = scan_inputs(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        states = mao.selective_scan(x["u"], x["delta"], x["A"], x["B"], None)
    manual = mao.selective_scan(x["u"].bfloat16(), x["delta"].bfloat16(), x["A"], x["B"].bfloat16(), None)
    used = {k: x[k] for k in ("u", "delta", "A", "B")}
    assert_same([states, *grads(states, used)], [manual, *grads(manual, used)])

    # As torch's rules do, autocast leaves float64 tensors alone.
    wide = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    with torch.autocast(device, dtype=torch.bfloat16):
        out = mao.selective_scan(*wide.values(), delta_softplus=True)
    assert out.dtype == torch.float64
    assert_same([out], [mao.selective_scan(*wide.values(), delta_softplus=True)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("direct", [False, True], ids=["mao", "torch.ops"])
def test_state_gather_runs_in_the_widest_input_dtype(device: str, dtype: torch.dtype, direct: bool):
    x = gather_inputs(device)

    def gather(h, offsets, weights):
        if direct:
            return ops.state_gather.default(h, offsets, weights, True, False)
        return mao.state_gather(h, offsets, weights)

    # States in the autocast dtype, positions in float32: the positions are not rounded, h is widened.
    with torch.autocast(device, dtype=dtype):
        out = gather(x["h"].to(dtype), x["offsets"], x["weights"].to(dtype))
    manual = gather(x["h"].to(dtype).float(), x["offsets"], x["weights"].to(dtype).float())
    assert out.dtype == torch.float32
    assert_same([out, *grads(out, x)], [manual, *grads(manual, x)])

    # All in the autocast dtype: nothing to cast.
    with torch.autocast(device, dtype=dtype):
        out = gather(*(t.to(dtype) for t in x.values()))
    manual = gather(*(t.to(dtype) for t in x.values()))
    assert out.dtype == dtype
    assert_same([out, *grads(out, x)], [manual, *grads(manual, x)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("direct", [False, True], ids=["mao", "torch.ops"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_multi_dilation_dwconv2d_runs_in_the_autocast_dtype(
    device: str, dtype: torch.dtype, direct: bool, channels_last: bool
):
    x = dwconv_inputs(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def conv(inp, weight, bias):
        inp = inp.to(memory_format=fmt)
        if direct:
            return ops.multi_dilation_dwconv2d.default(inp, weight, bias, [1, 2])
        return mao.multi_dilation_dwconv2d(inp, weight, bias)

    # float32 input and parameters, as conv2d's are under autocast.
    with torch.autocast(device, dtype=dtype):
        out = conv(*x.values())
    manual = conv(*(t.to(dtype) for t in x.values()))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    assert_same([out, *grads(out, x)], [manual, *grads(manual, x)])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ops_under_autocast_match_eager(device: str):
    def model(s, g, c):  # the scan's y (b, 8, 37) gathered as (b, S=4, D=2, 37)
        y = mao.selective_scan(s["u"], s["delta"], s["A"], s["B"], s["C"], s["D"], s["delta_bias"], True)
        h = mao.state_gather(y.view(2, 4, 2, 37), g["offsets"], g["weights"])
        return h, mao.multi_dilation_dwconv2d(c["x"], c["weight"], c["bias"])

    s, g, c = scan_inputs(device), gather_inputs(device, D=2, L=37), dwconv_inputs(device)
    leaves = {**{f"s.{k}": v for k, v in s.items()}, "offsets": g["offsets"], "weights": g["weights"], **c}
    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        with torch.autocast(device, dtype=torch.bfloat16):
            h, out = fn(s, g, c)
        assert (h.dtype, out.dtype) == (torch.float32, torch.bfloat16)
        loss = torch.cat([h.flatten(), out.float().flatten()])
        results.append([h, out, *grads(loss, leaves)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_direct_calls_with_defaults_left_out_or_named(device: str, compiled: bool):
    s, g, c = scan_inputs(device), gather_inputs(device), dwconv_inputs(device)

    def calls(bf16: bool):
        cast = (lambda t: t.bfloat16()) if bf16 else (lambda t: t)
        return (
            ops.selective_scan(cast(s["u"]), cast(s["delta"]), s["A"], cast(s["B"]), cast(s["C"]), delta_softplus=True),
            ops.state_gather(g["h"], g["offsets"], g["weights"]),
            ops.multi_dilation_dwconv2d(cast(c["x"]), cast(c["weight"])),
        )

    fn = torch.compile(calls, fullgraph=True) if compiled else calls
    with torch.autocast(device, dtype=torch.bfloat16):
        outs = fn(False)
    for out, manual in zip(outs, calls(True), strict=True):
        assert out.dtype == manual.dtype
        torch.testing.assert_close(out, manual, rtol=0, atol=0)
