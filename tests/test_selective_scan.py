"""selective_scan against its reference: every dtype, forward and backward, states mode, odd shapes, strides."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import mamba_adaptor_ops as mao
from helpers import DEVICE_DTYPES, DEVICES, assert_close_to_reference, check_against_reference, weight_dtype
from mamba_adaptor_ops import reference


def make_inputs(
    b=2, dim=8, L=33, N=1, G=2, dtype=torch.float32, device="cpu", with_C=True, with_D=True, with_bias=True, seed=0
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    wtype = weight_dtype(dtype)

    def randn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    return dict(
        u=randn(b, dim, L),
        delta=(torch.rand(b, dim, L, generator=gen, dtype=torch.float64) - 0.5).to(device=device, dtype=dtype),
        A=-torch.exp(randn(dim, N, dt=wtype, scale=0.5)),
        B=randn(b, G, N, L),
        C=randn(b, G, N, L) if with_C else None,
        D=randn(dim, dt=wtype) if with_D and with_C else None,
        delta_bias=randn(dim, dt=wtype, scale=0.5) if with_bias else None,
    )


def grad_like(inputs: dict, seed: int = 1) -> torch.Tensor:
    u, A = inputs["u"], inputs["A"]
    shape = u.shape if inputs["C"] is not None else (u.shape[0], u.shape[1], A.shape[1], u.shape[2])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(u.device)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize(
    "N,G,with_C,softplus",
    [(1, 2, True, True), (4, 1, True, False), (16, 4, True, True), (1, 4, False, True), (3, 2, False, False)],
    ids=["N1", "N4-G1", "N16-G4", "states-N1", "states-N3"],
)
def test_matches_reference(device, dtype, N, G, with_C, softplus):
    inputs = make_inputs(b=2, dim=8, L=37, N=N, G=G, dtype=dtype, device=device, with_C=with_C)
    check_against_reference(
        mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs), dtype, delta_softplus=softplus
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [1, 2, 7, 64])
@pytest.mark.parametrize("with_D,with_bias", [(False, False), (True, True)])
def test_lengths_and_optional_args(device, L, with_D, with_bias):
    inputs = make_inputs(b=1, dim=3, L=L, N=2, G=1, with_D=with_D, with_bias=with_bias, device=device)
    check_against_reference(mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    b, dim, L, N, G = 2, 6, 19, 2, 3
    gen = torch.Generator().manual_seed(3)
    inputs = dict(
        u=torch.randn(b, L, dim, generator=gen).to(device).transpose(1, 2),  # L not innermost: copied
        delta=torch.rand(b, 2 * dim, L, generator=gen).to(device)[:, ::2],  # strided channels: read in place
        A=-torch.rand(N, dim, generator=gen).to(device).t(),
        B=torch.randn(b, N, G, L, generator=gen).to(device).transpose(1, 2),
        C=torch.randn(G, b, N, L, generator=gen).to(device).transpose(0, 1),
        D=torch.randn(2 * dim, generator=gen).to(device)[::2],
        delta_bias=None,
    )
    assert not any(t.is_contiguous() for t in inputs.values() if t is not None)
    check_against_reference(
        mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs), torch.float32, delta_softplus=True
    )


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_time_steps(device, dtype):
    """delta + delta_bias on both sides of softplus's threshold (20), far below 0 (softplus underflows to subnormals
    and 0), and dt A far below 0 (the decay underflows to subnormals and 0), forward and backward."""
    inputs = make_inputs(b=1, dim=6, L=48, N=3, G=3, dtype=dtype, device=device)
    levels = torch.tensor([-120.0, -104.0, -90.0, -30.0, -1.0, 0.0, 3.0, 19.9, 20.0, 20.1, 45.0, 90.0])
    delta = levels[torch.randperm(48, generator=torch.Generator().manual_seed(0)) % 12].expand(1, 6, 48)
    inputs["delta"] = delta.to(device=device, dtype=dtype)
    inputs["delta_bias"] = torch.tensor([0.0, -0.1, 0.1, -0.05, 0.0, 0.0], device=device, dtype=inputs["A"].dtype)
    inputs["A"] = -torch.tensor([0.0, 1e-3, 0.3, 1.0, 2.0, 5.0], device=device, dtype=inputs["A"].dtype)[:, None] * (
        torch.arange(1, 4, device=device, dtype=inputs["A"].dtype)
    )
    check_against_reference(
        mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs), dtype, delta_softplus=True
    )


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("with_C", [True, False])
def test_non_finite_inputs_propagate_like_the_reference(device, dtype, with_C):
    """inf and NaN in delta, u, B, C give inf and NaN where the reference gives them, and the same values elsewhere:
    an infinite state stays infinite while its decay is > 0, subnormal included on the CPU, and turns NaN where
    the decay underflows to 0 (0 * inf). The CUDA kernels are built with fast math, as mamba_ssm's are, which
    flushes subnormal float32 values to 0 (measured on an H200): there a subnormal decay is 0 too, so batch 1
    gets a decay that underflows as batch 0's does."""
    inputs = make_inputs(b=2, dim=4, L=40, N=2, G=2, dtype=dtype, device=device, with_C=with_C)
    inputs["A"][1] = -30.0  # channel 1 from t = 20: dt A ~ -170 (decay 0) in batch 0, ~ -104 (subnormal) in batch 1
    inputs["delta"][0, 1, 20:] = 6.0
    inputs["delta"][1, 1, 20:] = 4.0 if device == "cpu" else 6.0
    for name, index, value in [
        ("delta", (0, 0, 3), float("inf")), ("delta", (0, 2, 5), float("-inf")), ("delta", (1, 3, 7), float("nan")),
        ("u", (0, 1, 10), float("inf")), ("u", (1, 2, 30), float("-inf")), ("u", (1, 0, 12), float("nan")),
        ("B", (1, 0, 1, 15), float("inf")), ("B", (0, 1, 0, 2), float("nan")),
    ]:
        inputs[name][index] = value
    if with_C:
        inputs["C"][0, 1, 1, 25] = float("inf")
    out = mao.selective_scan(**inputs, delta_softplus=True)
    ref = reference.selective_scan(**inputs, delta_softplus=True)
    exact = reference.selective_scan(
        **{k: None if v is None else v.double() for k, v in inputs.items()}, delta_softplus=True
    )
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[out.isinf()], ref[ref.isinf()])
    finite = ref.isfinite() & exact.isfinite()
    assert_close_to_reference("finite outputs", out[finite], ref[finite], exact[finite], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_states_mode_is_the_C1_D0_trick(device):
    """With N = 1, the states equal y computed with C = 1 and D = 0 (the paper's Alg. 1)."""
    inputs = make_inputs(N=1, G=2, with_C=False, device=device)
    states = mao.selective_scan(**inputs, delta_softplus=True)
    ones = torch.ones_like(inputs["B"])
    y = mao.selective_scan(**{**inputs, "C": ones}, delta_softplus=True)
    assert states.shape == (2, 8, 1, 33)
    torch.testing.assert_close(states[:, :, 0], y)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_length(device):
    for b, L in [(0, 5), (2, 0)]:
        inputs = make_inputs(b=b, L=L, N=2, device=device)
        leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
        y = mao.selective_scan(**inputs)
        assert y.shape == (b, 8, L)
        y.sum().backward()
        assert torch.equal(leaves["A"].grad, torch.zeros_like(leaves["A"]))


@pytest.mark.parametrize("N,with_C", [(1, True), (3, True), (2, False)])
def test_cpu_backward_is_bit_identical_for_every_thread_count(N, with_C):
    """The CPU backward's sums over channels (dB, dC over a group, split into chunks) and over t (dA, dD,
    ddelta_bias) run in a fixed order: the same bits on every run and for every thread count."""
    inputs = make_inputs(b=1, dim=40, L=37, N=N, G=1, with_C=with_C)
    grad = grad_like(inputs).float()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in [1, 2, 3, 1]:
            torch.set_num_threads(n)
            results.append(torch.ops.mamba_adaptor.selective_scan_backward(grad, *inputs.values(), True))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for a, b in zip(results[0], result):
            assert (a is None and b is None) or torch.equal(a, b)


def test_gradcheck_float64():
    inputs = make_inputs(b=1, dim=4, L=6, N=2, G=2, dtype=torch.float64)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    assert torch.autograd.gradcheck(lambda *a: mao.selective_scan(*a, delta_softplus=True), tuple(leaves.values()))
    states_inputs = (leaves["u"], leaves["delta"], leaves["A"], leaves["B"])
    assert torch.autograd.gradcheck(lambda u, d, A, B: mao.selective_scan(u, d, A, B, None), states_inputs)


@pytest.mark.parametrize("with_C", [True, False])
def test_opcheck(with_C):
    """Each op on rows of 300 steps: two checkpoints per (row, state)."""
    ops = torch.ops.mamba_adaptor
    inputs = make_inputs(b=2, dim=4, L=300, N=2, G=2, with_C=with_C)
    args = tuple(v.requires_grad_() if v is not None else None for v in inputs.values())
    torch.library.opcheck(ops.selective_scan.default, (*args, True))
    torch.library.opcheck(ops.selective_scan_forward.default, (*args, True))
    grad = grad_like(inputs).float()
    detached = tuple(a.detach() if a is not None else None for a in args)
    checkpoints = ops.selective_scan_forward(*detached, True)[1]
    assert checkpoints.shape == (2, 4, 2, 2)
    torch.library.opcheck(ops.selective_scan_backward.default, (grad, *detached, True))
    torch.library.opcheck(ops.selective_scan_backward.default, (grad, *detached, True, False, checkpoints))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N,with_C", [(1, True), (3, True), (2, False)], ids=["N1", "N3", "states-N2"])
def test_forward_checkpoints_are_the_states_at_segment_ends(device, dtype, N, with_C):
    """selective_scan_forward returns selective_scan's output and, in A's dtype, the states after every S steps
    but at L (S = 256 for d_state 1 in 16-bit types, else 128: the backward's segments)."""
    L = 600
    inputs = make_inputs(b=2, dim=4, L=L, N=N, G=2, dtype=dtype, device=device, with_C=with_C)
    out, checkpoints = torch.ops.mamba_adaptor.selective_scan_forward(*inputs.values(), True)
    assert torch.equal(out, torch.ops.mamba_adaptor.selective_scan(*inputs.values(), True))
    S = 256 if N == 1 and dtype in (torch.float16, torch.bfloat16) else 128
    exact = {k: None if v is None else v.cpu().double() for k, v in inputs.items()}
    states = reference.selective_scan(exact["u"], exact["delta"], exact["A"], exact["B"], None, None,
                                      exact["delta_bias"], True)  # fmt: skip
    expected = states[..., S - 1 :: S][..., : (L - 1) // S].transpose(2, 3)  # (b, dim, L // S, N)
    assert checkpoints.dtype == inputs["A"].dtype and checkpoints.shape == expected.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(checkpoints.cpu().double(), expected, rtol=tol, atol=tol)


def test_bad_checkpoints_raise_clear_errors():
    ops = torch.ops.mamba_adaptor
    inputs = make_inputs(L=300)  # d_state 1, float32: segments of 128 steps, two checkpoints
    grad = grad_like(inputs).float()
    checkpoints = ops.selective_scan_forward(*inputs.values(), True)[1]
    with pytest.raises(RuntimeError, match=r"selective_scan_backward: expected `checkpoints` to have shape "
                       r"\(b, dim, \(L - 1\) // S, N\) .* = \(2, 8, 2, 1\), but got \(2, 8, 1, 1\)"):  # fmt: skip
        ops.selective_scan_backward(grad, *inputs.values(), True, False, checkpoints[:, :, :1])
    with pytest.raises(RuntimeError, match=r"expected `checkpoints` to have dtype torch.float32 .*got torch.float64"):
        ops.selective_scan_backward(grad, *inputs.values(), True, False, checkpoints.double())


@settings(max_examples=100, deadline=None)
@given(
    b=st.integers(1, 3),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    L=st.integers(1, 12),
    N=st.integers(1, 5),
    with_C=st.booleans(),
    softplus=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_float64(b, groups, per_group, L, N, with_C, softplus, seed):
    """Any shape agrees with the reference to float64 round-off, forward and backward."""
    inputs = make_inputs(b, groups * per_group, L, N, groups, torch.float64, with_C=with_C, seed=seed)
    check_against_reference(
        mao.selective_scan, reference.selective_scan, inputs, grad_like(inputs, seed), torch.float64,
        delta_softplus=softplus,
    )


BAD_INPUTS = [
    ("u rank", lambda a: a.update(u=a["u"][0]), r"expected `u` to be a 3-D tensor \(b, dim, L\), but got a 2-D"),
    ("u dtype", lambda a: a.update(u=a["u"].int()), r"expected `u` to have dtype torch.float32, .* but got torch.int32"),
    ("delta shape", lambda a: a.update(delta=a["delta"][..., :-1]), r"`delta` to have shape .* = \(2, 8, 33\), but got \(2, 8, 32\)"),
    ("delta dtype", lambda a: a.update(delta=a["delta"].double()), r"`delta` to have dtype torch.float32 .*got torch.float64"),
    ("A shape", lambda a: a.update(A=a["A"][:-1]), r"`A` to have shape \(dim, N\) with dim = 8 .*got \(7, 1\)"),
    ("A dtype", lambda a: a.update(A=a["A"].half()), r"`A` to have dtype torch.float32 .*got torch.float16"),
    ("A no states", lambda a: a.update(A=a["A"][:, :0]), r"`A` to have d_state N >= 1"),
    ("groups", lambda a: a.update(B=torch.cat([a["B"], a["B"][:, :1]], 1)), r"G >= 1 dividing dim = 8, but got G = 3"),
    ("B length", lambda a: a.update(B=a["B"][..., :5]), r"`B` to have shape \(b, G, N, L\) = \(2, 2, 1, 33\)"),
    ("C shape", lambda a: a.update(C=a["C"][:1]), r"`C` to have shape \(b, G, N, L\), like B"),
    ("C dtype", lambda a: a.update(C=a["C"].double()), r"`C` to have dtype torch.float32"),
    ("D shape", lambda a: a.update(D=a["D"][:3]), r"`D` to have shape \(dim,\) = \(8,\), but got \(3,\)"),
    ("D dtype", lambda a: a.update(D=a["D"].half()), r"`D` to have dtype torch.float32"),
    ("D in states mode", lambda a: a.update(C=None), r"`D` must be None when `C` is None"),
    ("delta_bias shape", lambda a: a.update(delta_bias=a["delta_bias"][None]), r"`delta_bias` to be|`delta_bias` to have shape"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, mutate, message):
    inputs = make_inputs()
    mutate(inputs)
    with pytest.raises(RuntimeError, match=message):
        mao.selective_scan(**inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise():
    inputs = make_inputs(device="cuda")
    inputs["A"] = inputs["A"].cpu()
    with pytest.raises(RuntimeError, match=r"expected `A` on the device of `u` \(cuda:0\), but got cpu"):
        mao.selective_scan(**inputs)


def test_bad_grad_out_raises():
    inputs = make_inputs()
    with pytest.raises(RuntimeError, match=r"selective_scan_backward: expected `grad_out` to have shape"):
        torch.ops.mamba_adaptor.selective_scan_backward(torch.zeros(2, 8, 5), *inputs.values(), False)


def test_deterministic_follows_torch_by_default(monkeypatch):
    """`deterministic=None` takes torch.are_deterministic_algorithms_enabled(), and reaches the backward op."""
    seen = []
    backward = torch.ops.mamba_adaptor.selective_scan_backward

    def spy(*args):
        seen.append(args[9])
        return backward(*args)

    monkeypatch.setattr(torch.ops.mamba_adaptor, "selective_scan_backward", spy)
    inputs = {k: None if v is None else v.requires_grad_() for k, v in make_inputs(b=1, dim=2, L=5).items()}
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for enabled in (False, True):
            torch.use_deterministic_algorithms(enabled)
            mao.selective_scan(**inputs).sum().backward()
        mao.selective_scan(**inputs, deterministic=False).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == [False, True, False]


def test_autograd_backward_starts_from_the_forward_checkpoints(monkeypatch):
    """selective_scan records selective_scan_forward, whose checkpoints reach the backward op; a direct
    torch.ops call records a backward without them; without grad the plain op runs (the FLOP counter names it)."""
    ops = torch.ops.mamba_adaptor
    given = []
    backward = ops.selective_scan_backward
    monkeypatch.setattr(ops, "selective_scan_backward", lambda *a: given.append(a[10] is not None) or backward(*a))
    inputs = {k: None if v is None else v.requires_grad_() for k, v in make_inputs(b=1, dim=2, L=300).items()}
    for run in (lambda: mao.selective_scan(**inputs), lambda: ops.selective_scan(*inputs.values())):
        with FlopCounterMode(display=False) as counter:
            run().sum().backward()
        given.append(sorted(str(op) for op in counter.get_flop_counts()["Global"]))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mao.selective_scan(**inputs)
    given.append(sorted(str(op) for op in counter.get_flop_counts()["Global"]))
    assert given == [
        True, ["mamba_adaptor.selective_scan_backward", "mamba_adaptor.selective_scan_forward"],
        False, ["mamba_adaptor.selective_scan", "mamba_adaptor.selective_scan_backward"],
        ["mamba_adaptor.selective_scan"],
    ]  # fmt: skip
