"""state_gather (Adaptor-T) against its reference: dtypes, fwd/bwd, expanded weights, out-of-range and
non-finite offsets, the deterministic backward."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_adaptor_ops as mao
from helpers import DEVICE_DTYPES, DEVICES, check_against_reference, random_like
from mamba_adaptor_ops import reference


def make_inputs(b=2, S=4, D=12, L=29, K=4, dtype=torch.float32, device="cpu", spread=4.0, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, fn=torch.randn):
        return (fn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    # Offsets mix fractional positions, exact integers and positions beyond both ends of the sequence.
    offsets = rand(b, S, K, L, scale=spread)
    offsets.view(-1)[::7] = offsets.view(-1)[::7].round()
    return dict(h=rand(b, S, D, L), offsets=offsets, weights=torch.softmax(rand(b, S, K, L), dim=2))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("residual", [True, False])
def test_matches_reference(device, dtype, residual):
    inputs = make_inputs(dtype=dtype, device=device)
    grad = torch.randn(inputs["h"].shape, dtype=torch.float64).to(device)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, grad, dtype, residual=residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 2, 3, 2, 1), (3, 1, 5, 1, 3), (1, 4, 7, 300, 4), (2, 2, 20, 75, 3)])
def test_odd_shapes(device, shape):
    b, S, D, L, K = shape
    inputs = make_inputs(b, S, D, L, K, device=device, spread=L / 2 + 1)
    grad = torch.randn(inputs["h"].shape, dtype=torch.float64).to(device)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, grad, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_and_strided_weights(device):
    """Weights shared over b and L (stride 0) and offsets with a transposed layout are read in place."""
    b, S, D, L, K = 3, 4, 5, 17, 4
    inputs = make_inputs(b, S, D, L, K, device=device)
    inputs["weights"] = torch.softmax(torch.randn(S, K), -1).to(device).view(1, S, K, 1).expand(b, S, K, L)
    inputs["offsets"] = inputs["offsets"].transpose(2, 3).contiguous().transpose(2, 3)
    assert inputs["weights"].stride() == (0, K, 1, 0)
    grad = torch.randn(inputs["h"].shape, dtype=torch.float64).to(device)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, grad, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_positions_outside_the_sequence_read_zero(device):
    h = torch.arange(1.0, 6.0, device=device).view(1, 1, 1, 5)  # 1 2 3 4 5
    w = torch.ones(1, 1, 1, 5, device=device)
    for offset, expected in [
        (-10.0, [0, 0, 0, 0, 0]),
        (-0.5, [0.5, 1.5, 2.5, 3.5, 4.5]),  # t - 0.5: position -0.5 reads half of h[0]
        (1.0, [2, 3, 4, 5, 0]),
        (1e30, [0, 0, 0, 0, 0]),
        (-1e30, [0, 0, 0, 0, 0]),
    ]:
        out = mao.state_gather(h, torch.full_like(w, offset), w, residual=False)
        torch.testing.assert_close(out.view(-1), torch.tensor(expected, dtype=h.dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_offsets_give_non_finite_outputs(device, bad):
    inputs = make_inputs(b=1, S=2, D=3, L=8, K=2, device=device)
    inputs["offsets"][0, 1, 0, 5] = bad
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    out = mao.state_gather(**leaves)
    finite = torch.isfinite(out)
    assert not finite[0, 1, :, 5].any()
    assert finite.sum() == out.numel() - 3  # only the D outputs at (s=1, t=5) are touched
    out.backward(torch.ones_like(out))
    assert torch.isfinite(leaves["h"].grad).all()  # an invalid position scatters nothing


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bit_identical(device):
    inputs = make_inputs(b=2, S=4, D=16, L=200, K=4, spread=2.0, device=device)
    grad = torch.randn(inputs["h"].shape).to(device)
    runs = [
        torch.ops.mamba_adaptor.state_gather_backward(grad, *inputs.values(), True, True) for _ in range(3)
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    fast = torch.ops.mamba_adaptor.state_gather_backward(grad, *inputs.values(), True, False)
    for a, b in zip(runs[0], fast):
        torch.testing.assert_close(a, b)


def test_deterministic_follows_torch_setting():
    inputs = {k: v.requires_grad_() for k, v in make_inputs(b=1, S=1, D=2, L=5, K=1).items()}
    torch.use_deterministic_algorithms(True)
    try:
        out = mao.state_gather(**inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    assert out.grad_fn.deterministic is True  # the autograd context of the op: saved for the backward
    assert mao.state_gather(**inputs).grad_fn.deterministic is False


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for shape in [(0, 2, 3, 4, 2), (1, 2, 0, 4, 2), (1, 2, 3, 0, 2)]:
        b, S, D, L, K = shape
        inputs = {k: v.requires_grad_() for k, v in make_inputs(b, S, D, L, K, device=device).items()}
        out = mao.state_gather(**inputs)
        assert out.shape == (b, S, D, L)
        out.sum().backward()
        assert torch.count_nonzero(inputs["weights"].grad) == 0


def test_gradcheck_float64():
    inputs = make_inputs(b=1, S=2, D=3, L=7, K=3, dtype=torch.float64, spread=2.0)
    inputs["offsets"] = inputs["offsets"].round() + 0.37  # away from the kinks at integer positions
    leaves = tuple(v.requires_grad_() for v in inputs.values())
    assert torch.autograd.gradcheck(mao.state_gather, leaves)
    assert torch.autograd.gradcheck(lambda *a: mao.state_gather(*a, residual=False), leaves)


def test_opcheck():
    inputs = make_inputs(b=2, S=2, D=3, L=9, K=2)
    args = tuple(v.requires_grad_() for v in inputs.values())
    torch.library.opcheck(torch.ops.mamba_adaptor.state_gather.default, (*args, True, False))
    grad = torch.randn(inputs["h"].shape)
    torch.library.opcheck(
        torch.ops.mamba_adaptor.state_gather_backward.default, (grad, *(a.detach() for a in args), False, True)
    )


@settings(max_examples=100, deadline=None)
@given(
    b=st.integers(1, 2),
    S=st.integers(1, 4),
    D=st.integers(1, 4),
    L=st.integers(1, 24),
    K=st.integers(1, 5),
    spread=st.sampled_from([0.5, 3.0, 40.0]),
    residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_float64(b, S, D, L, K, spread, residual, seed):
    inputs = make_inputs(b, S, D, L, K, torch.float64, spread=spread, seed=seed)
    grad = random_like(inputs["h"], seed)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, grad, torch.float64, residual=residual)


@settings(max_examples=40, deadline=None)
@given(
    D=st.integers(1, 20),
    L=st.integers(1, 40),
    K=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_single_precision(D, L, K, dtype, residual, seed):
    """float32 and bfloat16 (the CPU kernels' vector transposes: full 8 x 8 blocks and their edges)."""
    inputs = make_inputs(2, 2, D, L, K, dtype, spread=L / 4 + 1, seed=seed)
    grad = random_like(inputs["h"], seed)
    check_against_reference(mao.state_gather, reference.state_gather, inputs, grad, dtype, residual=residual)


BAD_INPUTS = [
    ("h rank", lambda a: a.update(h=a["h"][0]), r"state_gather: expected `h` to be a 4-D tensor \(b, S, D, L\)"),
    ("h dtype", lambda a: a.update(h=a["h"].long()), r"`h` to have dtype .* but got torch.int64"),
    ("offsets rank", lambda a: a.update(offsets=a["offsets"][0]), r"`offsets` to be a 4-D tensor \(b, S, K, L\)"),
    ("offsets L", lambda a: a.update(offsets=a["offsets"][..., :3]), r"`offsets` to have shape .* = \(2, 4, 4, 29\), but got \(2, 4, 4, 3\)"),
    ("offsets S", lambda a: a.update(offsets=a["offsets"][:, :2]), r"`offsets` to have shape"),
    ("no points", lambda a: a.update(offsets=a["offsets"][:, :, :0]), r"`offsets` to have K >= 1 points"),
    ("offsets dtype", lambda a: a.update(offsets=a["offsets"].double()), r"`offsets` to have dtype torch.float32 \(the dtype of h\)"),
    ("weights shape", lambda a: a.update(weights=a["weights"][:, :, :2]), r"`weights` to have shape \(b, S, K, L\), like offsets"),
    ("weights dtype", lambda a: a.update(weights=a["weights"].half()), r"`weights` to have dtype torch.float32"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, mutate, message):
    inputs = make_inputs()
    mutate(inputs)
    with pytest.raises(RuntimeError, match=message):
        mao.state_gather(**inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise():
    inputs = make_inputs(device="cuda")
    inputs["weights"] = inputs["weights"].cpu()
    with pytest.raises(RuntimeError, match=r"expected `weights` on the device of `h` \(cuda:0\), but got cpu"):
        mao.state_gather(**inputs)
