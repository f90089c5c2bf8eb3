"""AdaptorT and AdaptorS modules: their modes, initialisation and gradients."""

from __future__ import annotations

import pytest
import torch

import mamba_adaptor_ops as mao
from mamba_adaptor_ops import reference
from mamba_adaptor_ops.nn import default_offsets


def test_default_offsets_are_nearest_first():
    assert default_offsets(5) == [-1.0, 1.0, -2.0, 2.0, -3.0]


@pytest.mark.parametrize("positions", ["learnable", "static"])
@pytest.mark.parametrize("coefficients", ["predicted", "shared"])
def test_adaptor_t_modes_match_reference(positions, coefficients):
    torch.manual_seed(0)
    b, S, D, L, K = 2, 4, 6, 15, 3
    module = mao.AdaptorT(D, num_points=K, num_sequences=S, positions=positions, coefficients=coefficients)
    if module.offset_proj is not None:
        torch.nn.init.normal_(module.offset_proj.weight)  # move away from the static init
    h = torch.randn(b, S, D, L, requires_grad=True)
    out = module(h)

    x = h.detach().transpose(2, 3)  # (b, S, L, D)
    if positions == "learnable":
        offsets = module.offset_proj(x).transpose(2, 3)
    else:
        offsets = module.static_offsets.view(1, 1, K, 1).expand(b, S, K, L)
    if coefficients == "predicted":
        weights = torch.softmax(module.coef_proj(x), dim=-1).transpose(2, 3)
    else:
        weights = torch.softmax(module.shared_coef, -1).view(1, S, K, 1).expand(b, S, K, L)
    torch.testing.assert_close(out, reference.state_gather(h.detach(), offsets, weights))

    out.square().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adaptor_t_learnable_starts_at_static_positions():
    torch.manual_seed(0)
    learnable = mao.AdaptorT(8, num_points=4, coefficients="shared")
    static = mao.AdaptorT(8, num_points=4, positions="static", coefficients="shared")
    h = torch.randn(2, 4, 8, 10)
    torch.testing.assert_close(learnable(h), static(h))


def test_adaptor_t_custom_static_offsets_and_errors():
    module = mao.AdaptorT(4, num_points=2, num_sequences=1, positions="static", static_offsets=[-0.5, 3])
    assert module.static_offsets.tolist() == [-0.5, 3.0]
    with pytest.raises(ValueError, match="static_offsets must hold num_points = 3 values, got 2"):
        mao.AdaptorT(4, num_points=3, static_offsets=[1, 2])
    with pytest.raises(ValueError, match="positions must be 'learnable' or 'static'"):
        mao.AdaptorT(4, positions="random")
    with pytest.raises(ValueError, match="coefficients must be 'predicted' or 'shared'"):
        mao.AdaptorT(4, coefficients="fixed")
    shared = mao.AdaptorT(4, num_sequences=4, coefficients="shared")
    with pytest.raises(ValueError, match="built for 4 sequences, got h with S = 2"):
        shared(torch.randn(1, 2, 4, 5))


def test_adaptor_t_bfloat16():
    module = mao.AdaptorT(8, num_points=4)
    h = torch.randn(2, 4, 8, 12, dtype=torch.bfloat16)
    out = module(h)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_adaptor_s_matches_reference(channels_last):
    torch.manual_seed(0)
    module = mao.AdaptorS(6, kernel_size=5, dilations=(1, 2, 3))
    torch.nn.init.normal_(module.bias)
    x = torch.randn(2, 6, 9, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = module(x)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = reference.multi_dilation_dwconv2d(x, module.weight.detach(), module.bias.detach(), (1, 2, 3))
    torch.testing.assert_close(out, expected)


def test_adaptor_s_zero_init_outputs_zero_and_learns():
    module = mao.AdaptorS(4, zero_init=True)
    x = torch.randn(1, 4, 6, 6)
    out = module(x)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert module.weight.grad.abs().sum() > 0
