"""SS2D and the Vim mixer with adaptors: the wiring against a plain-PyTorch recomputation, every Table 5 row,
both insertion forms, d_state > 1, autocast."""

from __future__ import annotations

import pytest
import torch

import mamba_adaptor_ops as mao
from mamba_adaptor_ops import reference
from mamba_adaptor_ops.nn import SS2D, AdaptorConfig, VimMixer, cross_merge, cross_scan, read_out


def _perturb(module: torch.nn.Module, scale: float = 0.2) -> None:
    """Moves every parameter off its initial value (zero projections, static positions) as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_cross_scan_orders_and_adjoint():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    xs = cross_scan(x)
    assert xs[0, :, 0].tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    x, ys = torch.randn(2, 3, 4, 5), torch.randn(2, 4, 3, 20)
    torch.testing.assert_close((cross_scan(x) * ys).sum(), (x * cross_merge(ys, 4, 5)).sum())


def _ss2d_by_hand(block: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D's sequential form recomputed from the reference ops, one direction at a time."""
    b, _, H, W = x.shape
    S, D, N, R, L = 4, block.d_inner, block.d_state, block.dt_rank, H * W
    u_map = torch.nn.functional.silu(block.conv2d(torch.einsum("oc,bchw->bohw", block.in_proj.weight, x)))
    flat = [u_map.flatten(2), u_map.transpose(2, 3).flatten(2)]
    seqs = [flat[0], flat[1], flat[0].flip(-1), flat[1].flip(-1)]  # each (b, D, L)
    states, Cs = [], []
    for s, u in enumerate(seqs):
        proj = torch.einsum("cd,bdl->bcl", block.x_proj_weight[s], u)
        dt = torch.einsum("dr,brl->bdl", block.dt_projs_weight[s], proj[:, :R])
        A = -block.A_logs.view(S, D, N)[s].exp()
        h = reference.selective_scan(u, dt, A, proj[:, None, R : R + N], None, None, block.dt_projs_bias[s], True)
        states.append(h.reshape(b, D * N, L))  # (b, D*N, L)
        Cs.append(proj[:, R + N :])  # (b, N, L)
    h = torch.stack(states, 1)  # (b, S, D*N, L)
    t = block.adaptor_t
    feats = h.transpose(2, 3)  # (b, S, L, D*N)
    offsets = t.offset_proj(feats).transpose(2, 3) if t.positions == "learnable" else t.static_offsets.view(1, 1, -1, 1).expand(b, S, -1, L)
    weights = torch.softmax(t.coef_proj(feats), -1).transpose(2, 3)
    h = reference.state_gather(h, offsets, weights).view(b, S, D, N, L)
    ys = [(h[:, s] * Cs[s][:, None]).sum(2) + block.Ds.view(S, D)[s, :, None] * seqs[s] for s in range(S)]
    y = ys[0] + ys[2].flip(-1)
    y_cols = ys[1] + ys[3].flip(-1)
    y = y.view(b, D, H, W) + y_cols.view(b, D, W, H).transpose(2, 3)
    y = y + block.adaptor_s(y)
    y = torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (D,), block.out_norm.weight, block.out_norm.bias)
    return torch.einsum("oc,bhwc->bohw", block.out_proj.weight, y)


@pytest.mark.parametrize("d_state, positions", [(1, "learnable"), (2, "static")])
def test_sequential_ss2d_matches_plain_pytorch(d_state, positions):
    torch.manual_seed(0)
    block = SS2D(12, d_state=d_state, adaptor=dict(positions=positions, num_points=3, kernel_size=3))
    _perturb(block, 0.1)
    x = torch.randn(2, 12, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _ss2d_by_hand(block, x), rtol=1e-4, atol=1e-5)


# Table 5: Adaptor-T absent / static / learnable x Adaptor-S absent / 1 / 2 dilations.
TABLE5 = [(t, d) for t in (None, "static", "learnable") for d in ((), (1,), (1, 2)) if t or d]


@pytest.mark.parametrize("positions, dilations", TABLE5)
def test_table5_rows_build_and_train(positions, dilations):
    torch.manual_seed(0)
    cfg = AdaptorConfig(positions=positions, dilations=dilations, num_points=4)
    block, plain = SS2D(16, adaptor=cfg), SS2D(16)
    x = torch.randn(2, 16, 6, 5)
    out = block(x)
    out.square().mean().backward()
    assert out.shape == x.shape
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    extra = sum(p.numel() for p in block.parameters()) - sum(p.numel() for p in plain.parameters())
    D, K, k = 16, 4, cfg.kernel_size
    expected_t = {None: 0, "static": D * K + K, "learnable": 2 * (D * K + K)}[positions]  # phi_c (+ phi_p)
    hidden = cfg.hidden_channels(D)
    expected_s = (len(dilations) * k * k * D + D + D * hidden + hidden + hidden * D + D) if dilations else 0
    assert extra == expected_t + expected_s
    assert (block.adaptor_t is None) == (positions is None) and (block.adaptor_s is None) == (not dilations)
    if positions:
        assert block.adaptor_t.positions == positions


def test_adaptor_config_validation_and_defaults():
    assert AdaptorConfig().kernel_size == 7 and AdaptorConfig().hidden_ratio == 3 / 8
    assert AdaptorConfig(form="parallel").kernel_size == 3 and AdaptorConfig(form="parallel").hidden_ratio == 1 / 6
    assert AdaptorConfig.make({"dilations": [1, 3]}).dilations == (1, 3)
    with pytest.raises(ValueError, match="form must be"):
        AdaptorConfig(form="side")
    with pytest.raises(ValueError, match="kernel_size must be 3, 5 or 7"):
        AdaptorConfig(kernel_size=4)
    with pytest.raises(ValueError, match="adds nothing"):
        AdaptorConfig(positions=None, dilations=())
    with pytest.raises(TypeError, match="adaptor must be"):
        AdaptorConfig.make(3)
    block = SS2D(8, adaptor="sequential")
    with pytest.raises(ValueError, match="already has adaptors"):
        block.add_adaptors("parallel")


@pytest.mark.parametrize("positions", ["learnable", "static", None])
def test_parallel_ss2d_starts_unchanged_then_learns(positions):
    torch.manual_seed(0)
    block = SS2D(16, d_state=2)
    _perturb(block)
    x = torch.randn(2, 16, 5, 6)
    before = block(x).detach()
    block.add_adaptors(AdaptorConfig(form="parallel", positions=positions, num_points=4))
    assert block.parallel is not None and block.adaptor_t is None and block.adaptor_s is None
    out = block(x)
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    fc2 = block.parallel.mixer.proj.fc2
    assert fc2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fc2.weight.add_(0.1)
    assert not torch.allclose(block(x), before)


@pytest.mark.parametrize("N", [1, 3])
def test_read_out_of_states_equals_full_scan(N):
    """y = sum_n C_n h_n + D u from the states mode reproduces the scan's own y (Alg. 1 for any d_state)."""
    torch.manual_seed(0)
    b, S, D, L = 2, 4, 5, 7
    u, delta = torch.randn(b, S * D, L), torch.rand(b, S * D, L)
    A, B, C = -torch.rand(S * D, N) - 0.1, torch.randn(b, S, N, L), torch.randn(b, S, N, L)
    Ds, bias = torch.randn(S * D), torch.randn(S * D)
    y = mao.selective_scan(u, delta, A, B, C, Ds, bias, True).view(b, S, D, L)
    states = mao.selective_scan(u, delta, A, B, None, None, bias, True).view(b, S, D * N, L)
    torch.testing.assert_close(read_out(states, C, u.view(b, S, D, L), Ds), y)


def test_ss2d_autocast_bfloat16():
    torch.manual_seed(0)
    block = SS2D(16, adaptor=dict(num_points=4))
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), block(x), rtol=0.1, atol=0.1)


def test_vim_mixer_is_bidirectional():
    """Without adaptors, flipping the tokens and swapping the two directions' weights flips the output."""
    torch.manual_seed(0)
    mixer = VimMixer(8, d_state=4)
    _perturb(mixer, 0.05)
    x = torch.randn(2, 10, 8)
    swapped = VimMixer(8, d_state=4)
    state = {k: v.clone() for k, v in mixer.state_dict().items()}
    D = mixer.d_inner
    for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
        state[name] = state[name].flip(0)
    for name in ("A_logs", "Ds", "conv1d.weight", "conv1d.bias"):
        state[name] = torch.cat([state[name][D:], state[name][:D]])
    swapped.load_state_dict(state)
    torch.testing.assert_close(swapped(x.flip(1)), mixer(x).flip(1), rtol=1e-4, atol=1e-5)


def test_vim_mixer_with_adaptors():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 8)
    mixer = VimMixer(8, d_state=2, adaptor=dict(num_points=4, kernel_size=3))
    out = mixer(x, hw=(3, 4))
    out.square().mean().backward()
    assert out.shape == x.shape and all(p.grad is not None for p in mixer.parameters())
    with pytest.raises(ValueError, match="pass hw=\\(H, W\\)"):
        mixer(x)
    with pytest.raises(ValueError, match="holds 10 tokens"):
        mixer(x, hw=(2, 5))

    plain = VimMixer(8, d_state=2)
    _perturb(plain)
    before = plain(x, hw=(3, 4)).detach()
    plain.add_adaptors("parallel")
    torch.testing.assert_close(plain(x, hw=(3, 4)), before, rtol=1e-5, atol=1e-6)
