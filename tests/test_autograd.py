"""The ops' two autograd routes: the public functions (a torch.autograd.Function, in eager mode) and direct
torch.ops calls (the registered autograd) give the same outputs and gradients, bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_multi_dilation_dwconv2d import make_inputs as conv_inputs
from test_selective_scan import make_inputs as scan_inputs
from test_state_gather import make_inputs as gather_inputs

import mamba_adaptor_ops as mao
from helpers import run_with_grads

OPS = torch.ops.mamba_adaptor
CASES = {
    "selective_scan": (
        mao.selective_scan,
        lambda **x: OPS.selective_scan(**x, delta_softplus=True),
        lambda: scan_inputs(b=2, dim=6, L=37, N=2, G=3),
        dict(delta_softplus=True),
    ),
    "state_gather": (
        mao.state_gather,
        lambda **x: OPS.state_gather(**x, residual=True, deterministic=False),
        lambda: gather_inputs(2, 3, 5, 29, 4),
        dict(residual=True, deterministic=False),
    ),
    "multi_dilation_dwconv2d": (
        mao.multi_dilation_dwconv2d,
        lambda **x: OPS.multi_dilation_dwconv2d(**x, dilations=[1, 2]),
        lambda: conv_inputs(),
        dict(dilations=(1, 2)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_public_function_and_registered_autograd_agree(name):
    public, direct, make, kwargs = CASES[name]
    inputs = make()
    grad = torch.randn_like(direct(**inputs))
    out, grads = run_with_grads(public, inputs, grad, **kwargs)
    out_direct, grads_direct = run_with_grads(direct, inputs, grad)
    assert torch.equal(out, out_direct)
    assert grads.keys() == grads_direct.keys()
    for k in grads:
        assert torch.equal(grads[k], grads_direct[k]), k


@pytest.mark.parametrize("name", list(CASES))
def test_public_function_takes_the_eager_route(name):
    public, direct, make, kwargs = CASES[name]
    leaves = {k: v.requires_grad_() for k, v in make().items() if v is not None}
    # The scan's public function records selective_scan_forward (its checkpoints spare the backward a pass).
    recorded = "selective_scan_forward" if name == "selective_scan" else name
    node = "".join(word.capitalize() for word in recorded.split("_")) + "Backward"  # StateGatherBackward
    assert type(public(**leaves, **kwargs).grad_fn).__name__ == node
    assert type(direct(**leaves).grad_fn).__name__ != node
    with torch.no_grad():
        assert public(**leaves, **kwargs).grad_fn is None
    with torch.inference_mode():
        assert public(**leaves, **kwargs).grad_fn is None


@pytest.mark.parametrize("route", ["public", "direct"])
@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_raises_instead_of_a_wrong_answer(name, route):
    public, direct, make, kwargs = CASES[name]
    leaves = {k: v.requires_grad_() for k, v in make().items() if v is not None}
    out = public(**leaves, **kwargs) if route == "public" else direct(**leaves)
    first = torch.autograd.grad(out.square().sum(), list(leaves.values()), create_graph=True)
    assert first[0].requires_grad
    with pytest.raises(RuntimeError, match=f"mamba_adaptor::{name}: its backward is not differentiable"):
        sum(g.square().sum() for g in first).backward()
