"""The CUDA kernels of cuda/, run on the CPU by the emulator in tests/cuda_emu, against the reference.

No GPU needed: tests/cuda_emu/build.py compiles the CUDA registration, argument checks, launchers and kernels
with g++ against the CUDA headers, as ops torch.ops.mamba_adaptor_emu.* that take CPU tensors. This checks the
kernels' index arithmetic, tilings, shared-memory plans, barriers and warp shuffles on every path (segments and
carries, staged windows and tiles, direct and staged convolutions, both shared-memory sizes a device may have),
that their results do not depend on the order in which threads run (a missing barrier would), and, again under
AddressSanitizer and ThreadSanitizer, that no access leaves its buffer or races with another thread's. The
fast-math transcendentals err within their documented bounds (emu.h). Counting each launch's global memory
sectors (tests/cuda_emu/traffic.py), it holds each op to the DRAM traffic it was designed for. It does not check
what only a GPU shows: the hardware's own transcendental errors, its memory ordering, speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cuda_selective_scan import GRAD_NAMES, assert_close_scaled, cpu_forward_backward
from test_multi_dilation_dwconv2d import make_inputs as conv_inputs
from test_selective_scan import grad_like as scan_grad
from test_selective_scan import make_inputs as scan_inputs
from test_state_gather import make_inputs as gather_inputs

from helpers import check_against_reference, random_like, run_with_grads
from mamba_adaptor_ops import reference
from mamba_adaptor_ops.bench.ops import OPS, stage_cases

EMU_DIR = Path(__file__).parent / "cuda_emu"
sys.path.insert(0, str(EMU_DIR))
import build as emu_build  # noqa: E402
from traffic import TrafficCounter  # noqa: E402

UNAVAILABLE = emu_build.available()  # why the emulator cannot be built here, or None
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"CUDA emulator: {UNAVAILABLE}")

# Set by the sanitized runs (test_kernels_under_*) for the run they start: "address" or "thread".
SANITIZER = os.environ.get("MAMBA_EMU_SANITIZER") or None
# The racecheck run (the slowest) leaves float16 out: it takes bfloat16's paths (2-byte elements, 8 per vector).
DTYPES = [torch.float32, torch.bfloat16] if SANITIZER == "thread" else [torch.float32, torch.float16, torch.bfloat16]
FORWARD_ORDER, REVERSE_ORDER, SHUFFLED = 0, 1, 2
# The emulated devices (emu.cpp's kDevices): an H100; 99 KiB of shared memory per block (sm_86, sm_89,
# sm_120); a T4 (sm_75, which the kernels are not built for); an H100 under a driver for CUDA 12.8.
H100, SMEM_99_KIB, T4, OLD_DRIVER = range(4)
# The error of the approximate transcendentals (emu.h): none, a fixed pseudo-random amount per input within the
# documented bound (the default), the whole bound up, the whole bound down.
EXACT_MATH, SPREAD_ERROR, UP_ERROR, DOWN_ERROR = range(4)


class Emulator:
    """The emulated ops, with the emulator's controls: device (H100, SMEM_99_KIB, T4, OLD_DRIVER), thread
    schedule, the error of the approximate transcendentals and which blocks run."""

    def __init__(self, library: Path):
        torch.ops.load_library(str(library))
        self.controls = ctypes.CDLL(str(library))
        self.controls.mamba_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
        self.controls.mamba_emu_set_last_blocks.argtypes = [ctypes.c_uint64]

    def configure(
        self,
        device: int = H100,
        schedule: int = FORWARD_ORDER,
        seed: int = 0,
        intrinsic_error: int = SPREAD_ERROR,
        last_blocks: int = 0,
    ) -> None:
        """`last_blocks` > 0 runs only that many blocks at the end of each launch."""
        assert device in (H100, SMEM_99_KIB, T4, OLD_DRIVER), device
        assert intrinsic_error in (EXACT_MATH, SPREAD_ERROR, UP_ERROR, DOWN_ERROR), intrinsic_error
        self.controls.mamba_emu_set_device(device)
        self.controls.mamba_emu_set_schedule(schedule, seed)
        self.controls.mamba_emu_set_intrinsic_error(intrinsic_error)
        self.controls.mamba_emu_set_last_blocks(last_blocks)

    def selftest(self, which: int) -> tuple[int, str, torch.Tensor]:
        """Runs fault `which` of tests/cuda_emu/selftest.cu: (status, message, output)."""
        out = torch.zeros(64)
        message = ctypes.create_string_buffer(1024)
        status = self.controls.mamba_emu_selftest(
            which, ctypes.c_void_p(out.data_ptr()), message, len(message)
        )
        return status, message.value.decode(), out

    @staticmethod
    def op(name: str, params: dict, forward_name: str | None = None):
        """`name` as a differentiable function of keyword arguments, `params` naming them with their defaults:
        forward and backward emulated. Every op's tensor arguments come first, and its backward returns one
        gradient per tensor argument. With `forward_name`, that op runs forward and returns (out, *saved), and
        the backward takes `saved` after the arguments (selective_scan_forward's checkpoints)."""
        forward = getattr(torch.ops.mamba_adaptor_emu, forward_name or name)
        backward = getattr(torch.ops.mamba_adaptor_emu, name + "_backward")

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = forward(*args)
                ctx.args = args
                if forward_name is None:
                    ctx.saved = ()
                    return out
                out, *ctx.saved = out
                return out

            @staticmethod
            def backward(ctx, grad):
                grads = backward(grad, *ctx.args, *ctx.saved)
                return (*grads, *[None] * (len(ctx.args) - len(grads)))

        def call(**kwargs):
            return Function.apply(*[kwargs.get(p, default) for p, default in params.items()])

        return call


@pytest.fixture(scope="module")
def emu():
    """The emulator (an H100, threads in index order, the GPU's approximate transcendentals), with torch
    filling every new tensor with NaN (its deterministic mode): an output element or workspace float that a
    kernel reads before writing, or never writes, shows as NaN (the emulator's initcheck)."""
    emulator = Emulator(emu_build.build(variant=SANITIZER))
    emulator.configure()
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield emulator
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
    emulator.configure()


def scan_op(emu, checkpoints: bool = True):
    """The scan as autograd runs it: its backward from the forward's checkpoints; without `checkpoints`, from
    its own first pass (what a direct torch.ops.mamba_adaptor.selective_scan call records)."""
    params = dict(
        u=None, delta=None, A=None, B=None, C=None, D=None, delta_bias=None, delta_softplus=False, deterministic=False
    )
    return emu.op("selective_scan", params, "selective_scan_forward" if checkpoints else None)


def gather_op(emu):
    return emu.op(
        "state_gather", dict(h=None, offsets=None, weights=None, residual=True, deterministic=False)
    )


def conv_op(emu):
    return emu.op("multi_dilation_dwconv2d", dict(x=None, weight=None, bias=None, dilations=(1, 2)))


def conv_reference(x, weight, bias=None, dilations=(1, 2)):
    """The reference on NCHW x: torch 2.13's CPU bfloat16 depthwise conv2d on channels_last x gives wrong weight
    gradients, even inf and NaN, with dilation > 1 on planes of 40 channels 70 x 70 (against float64)."""
    return reference.multi_dilation_dwconv2d(x.contiguous(), weight, bias, dilations)


# ---- selective_scan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "b,dim,L,N,G,with_C,softplus",
    [
        (2, 8, 300, 1, 2, True, True),  # d_state 1 path, two forward segments
        (2, 8, 1003, 16, 4, True, True),  # general path, 8 backward segments, a 2-byte aligned row
        (1, 5, 1, 1, 1, True, False),  # L = 1; 5 channels: blocks with channel-less warps
        (2, 40, 196, 1, 2, True, True),  # one-segment rows, d_state 1 (b2 stage 3): 4 rows a warp, the last tile short
        (2, 12, 49, 1, 3, False, True),  # the same in states mode, 4 channels per group: a warp's rows past the group
        (2, 20, 257, 1, 2, False, True),  # states mode, d_state 1, 10 channels per group
        (1, 4, 600, 40, 2, False, True),  # states mode, d_state > 32 (lanes loop over the states)
        (1, 3, 1000, 3, 3, True, True),  # one channel per group
    ],
)
def test_selective_scan(emu, dtype, b, dim, L, N, G, with_C, softplus):
    inputs = scan_inputs(b=b, dim=dim, L=L, N=N, G=G, dtype=dtype, with_C=with_C)
    check_against_reference(
        scan_op(emu), reference.selective_scan, inputs, scan_grad(inputs), dtype, delta_softplus=softplus
    )


def test_selective_scan_strided_inputs_and_no_optional_args(emu):
    """Without softplus the steps are delta itself, taken >= 0 as softplus would give: negative steps make the
    states grow as exp(|dt A|) over the 513 steps, and with them the error of the GPU's 2-ulp exp2f beyond the
    rule (1.13x)."""
    inputs = scan_inputs(b=2, dim=6, L=513, N=2, G=3, with_D=False, with_bias=False)
    inputs["delta"] = inputs["delta"].abs()
    inputs["u"] = inputs["u"].transpose(0, 1).contiguous().transpose(0, 1)  # (b, dim) strides swapped
    inputs["B"] = torch.cat([inputs["B"], inputs["B"]], dim=2)[:, :, ::2]  # N stride 2, L stride 1
    check_against_reference(scan_op(emu), reference.selective_scan, inputs, scan_grad(inputs), torch.float32)


def test_selective_scan_views_with_gaps(emu):
    """Every input a view, read through its strides (the test's copies keep them): u and B transposed, C with its
    batch and group dimensions swapped, A transposed, delta and D every other channel of a larger tensor; 1001
    steps, several segments."""
    b, dim, L, N, G = 2, 6, 1001, 2, 3
    gen = torch.Generator().manual_seed(3)
    inputs = dict(
        u=torch.randn(b, L, dim, generator=gen).transpose(1, 2),
        delta=torch.rand(b, 2 * dim, L, generator=gen)[:, ::2],
        A=-torch.rand(N, dim, generator=gen).t(),
        B=torch.randn(b, N, G, L, generator=gen).transpose(1, 2),
        C=torch.randn(G, b, N, L, generator=gen).transpose(0, 1),
        D=torch.randn(2 * dim, generator=gen)[::2],
        delta_bias=None,
    )
    check_against_reference(
        scan_op(emu), reference.selective_scan, inputs, scan_grad(inputs), torch.float32, delta_softplus=True
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "b,dim,L,N,G,with_C",
    [
        (2, 40, 300, 1, 2, True),  # 20 channels per group: three tiles, the last with channel-less warps
        (2, 24, 1003, 16, 1, False),  # states mode, general path, three tiles
        (1, 5, 129, 2, 1, True),  # one tile
        (2, 40, 100, 1, 2, True),  # one-segment rows, d_state 1: 4 rows a warp, tiles of 32 channels
    ],
)
def test_selective_scan_deterministic_backward(emu, dtype, b, dim, L, N, G, with_C):
    """The backward without float atomics (per-tile dB/dC and per-row dA/dD/ddelta_bias sums, added in order)
    against the reference, and against the atomic backward."""
    inputs = scan_inputs(b=b, dim=dim, L=L, N=N, G=G, dtype=dtype, with_C=with_C)
    grad = scan_grad(inputs)
    op = scan_op(emu)
    deterministic = functools.partial(op, deterministic=True)
    check_against_reference(deterministic, reference.selective_scan, inputs, grad, dtype, delta_softplus=True)
    _, atomic = run_with_grads(op, inputs, grad, delta_softplus=True)
    _, ordered = run_with_grads(deterministic, inputs, grad, delta_softplus=True)
    _, again = run_with_grads(deterministic, inputs, grad, delta_softplus=True)
    for k in atomic:
        torch.testing.assert_close(ordered[k], atomic[k], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        assert torch.equal(ordered[k], again[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "L,N,with_C",
    [
        (1003, 1, True),  # d_state 1: 3 checkpoints in 16-bit types (segments of 256 steps), 7 in float32
        (200, 1, True),  # rows of one forward segment (its short-row kernel): float32's backward has 2 segments
        (700, 3, False),  # states mode, general path: 5 checkpoints
    ],
)
def test_selective_scan_forward_checkpoints(emu, dtype, L, N, with_C):
    """The forward's checkpoints, as the CPU computes them, and the backward from them as from its own first
    pass (a different summation order: close, not equal)."""
    inputs = scan_inputs(b=2, dim=12, L=L, N=N, G=2, dtype=dtype, with_C=with_C)
    out, checkpoints = torch.ops.mamba_adaptor_emu.selective_scan_forward(*inputs.values(), True)
    expected_out, expected = torch.ops.mamba_adaptor.selective_scan_forward(*inputs.values(), True)
    assert checkpoints.shape == expected.shape and (L < 256 or checkpoints.shape[2] > 0)
    torch.testing.assert_close(checkpoints, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, torch.ops.mamba_adaptor_emu.selective_scan(*inputs.values(), True))
    grad = scan_grad(inputs)
    _, from_checkpoints = run_with_grads(scan_op(emu), inputs, grad, delta_softplus=True)
    _, own_pass = run_with_grads(scan_op(emu, checkpoints=False), inputs, grad, delta_softplus=True)
    for k in own_pass:
        torch.testing.assert_close(from_checkpoints[k], own_pass[k], rtol=1e-4 if dtype == torch.float32 else 1e-2,
                                   atol=1e-4)  # fmt: skip
    if checkpoints.numel() > 0:  # the backward starts from the checkpoints it is given
        backward = functools.partial(torch.ops.mamba_adaptor_emu.selective_scan_backward, grad.to(dtype))
        ddelta = backward(*inputs.values(), True, False, checkpoints)[1]  # (du does not depend on the states)
        assert not torch.equal(backward(*inputs.values(), True, False, checkpoints + 1)[1], ddelta)


# ---- state_gather ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "b,S,D,L,K,spread,residual",
    [
        (2, 4, 20, 296, 4, 4.0, True),  # one staged window, 16-byte staging (L % 8 == 0), a short row chunk
        (1, 2, 17, 3137, 3, 6.0, False),  # odd L: element-wise staging
        (1, 1, 9, 5000, 2, 900.0, True),  # tiles with halos; many samples outside the window
        (2, 1, 3, 40, 9, 30.0, True),  # more points than one group of the grad_offsets kernel
        (1, 3, 1, 1, 1, 1.0, True),  # L = 1, D = 1
    ],
)
def test_state_gather(emu, dtype, b, S, D, L, K, spread, residual):
    inputs = gather_inputs(b, S, D, L, K, dtype=dtype, spread=spread)
    check_against_reference(
        gather_op(emu), reference.state_gather, inputs, random_like(inputs["h"]), dtype, residual=residual
    )


def test_state_gather_expanded_weights_and_non_finite_offsets(emu):
    """Weights broadcast over (b, L) read in place; offsets far outside the row read nothing; NaN and inf
    offsets read nothing out of bounds and give what the CPU kernel gives (NaN where such a sample is used)."""
    inputs = gather_inputs(2, 2, 12, 64, 3, spread=10.0)
    inputs["weights"] = (
        torch.softmax(torch.randn(1, 2, 3, 1, dtype=torch.float64), dim=2).float().expand(2, 2, 3, 64)
    )
    inputs["offsets"][0, 0, 0, 5], inputs["offsets"][1, 0, 2, 9] = 1e30, -1e30
    grad = random_like(inputs["h"])
    check_against_reference(gather_op(emu), reference.state_gather, inputs, grad, torch.float32)
    offsets = inputs["offsets"]
    offsets[0, 0, 1, 5], offsets[0, 1, 1, 7], offsets[1, 1, 0, 3] = float("inf"), float("-inf"), float("nan")
    args = [*inputs.values(), True, False]
    for name in ("state_gather", "state_gather_backward"):
        emulated, cpu = getattr(torch.ops.mamba_adaptor_emu, name), getattr(torch.ops.mamba_adaptor, name)
        grad_args = [grad.float()] if name.endswith("backward") else []
        for a, b in zip(emulated(*grad_args, *args), cpu(*grad_args, *args)):
            torch.testing.assert_close(a, b, equal_nan=True, atol=2e-6, rtol=2e-6)


def test_state_gather_every_sample_on_one_position(emu):
    """Every sample of a segment interpolates between positions 2000 and 2001 of a row longer than one window:
    one bucket of the backward holds all K * L samples (one lane sums them all) and most tiles read both
    neighbours outside their staged window."""
    b, S, D, L, K = 1, 2, 20, 5000, 3
    inputs = gather_inputs(b, S, D, L, K, spread=1.0)
    inputs["offsets"] = (2000.25 - torch.arange(L, dtype=torch.float64)).expand(b, S, K, L).float().contiguous()
    check_against_reference(gather_op(emu), reference.state_gather, inputs, random_like(inputs["h"]), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "L,shifted",
    [
        (196, None),  # rows of 784 / 392 bytes: 16-byte loads for float32, 8-byte for 16-bit types (b2 stage 3)
        (98, None),  # 392 / 196 bytes: 8-byte loads for float32, one element for 16-bit types
        (4100, None),  # tiles with halos (L % 8 == 4): windows past the first start inside the row
        (296, "h"),  # h one element off 16-byte alignment: the forward and grad_points stage it element-wise
        (296, "grad_out"),  # grad_out one element off: grad_h stages it element-wise, the others 16 bytes
    ],
)
def test_state_gather_staging_load_widths(emu, dtype, L, shifted):
    """The windows are staged with 16-byte, 8-byte or one-element loads, as the rows' length and the tensors'
    alignment allow; 17 rows leave the last row chunk a single row (half a staged word in 16-bit types)."""
    inputs = gather_inputs(1, 2, 17, L, 3, dtype=dtype, spread=40.0)
    grad = random_like(inputs["h"]).to(dtype)

    def shift(t):  # the same values, one element past a 16-byte aligned address
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        return storage[1:].view(t.shape).copy_(t)

    if shifted == "h":
        inputs["h"] = shift(inputs["h"])
    elif shifted == "grad_out":
        grad = shift(grad)
    check_against_reference(gather_op(emu), reference.state_gather, inputs, grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("L,K,spread", [(24, 4, 8.0), (21, 3, 8.0), (24, 6, 2.0)])
def test_state_gather_several_row_chunks_per_block(emu, dtype, L, K, spread):
    """Short rows: each grad_h block, and with at most 4 points each forward block, stages several row chunks of
    its segment, and works out a position's samples (loads a run's buckets and their first entries) once for all
    of them. 4 x 4 segments of 521 channels on the emulated H100's 132 SMs take 2 chunks a block in 16-bit types
    (17 blocks a segment, the last with one chunk of 9 rows), 4 in float32 (the last block 2 chunks); L = 21 stages
    one element per load; K = 6 within 2 positions fills buckets past one group of entries."""
    inputs = gather_inputs(4, 4, 521, L, K, dtype=dtype, spread=spread)
    check_against_reference(gather_op(emu), reference.state_gather, inputs, random_like(inputs["h"]), dtype)


@pytest.mark.parametrize("L", [3200, 4096])
def test_state_gather_on_a_99_kib_device(emu, L):
    """With 99 KiB of shared memory per block (sm_86, sm_89, sm_120), L = 3200 no longer fits one window."""
    emu.configure(device=SMEM_99_KIB)
    try:
        inputs = gather_inputs(1, 2, 17, L, 3, dtype=torch.bfloat16, spread=300.0)
        check_against_reference(
            gather_op(emu), reference.state_gather, inputs, random_like(inputs["h"]), torch.bfloat16
        )
    finally:
        emu.configure()


# ---- multi_dilation_dwconv2d --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "b,C,H,W,k,dilations,bias",
    [
        (2, 5, 13, 17, 3, (1, 2), True),  # odd channels and sides
        (1, 40, 70, 70, 7, (1, 3), False),  # several tiles and channel blocks, k = 7
        (2, 3, 9, 8, 5, (1, 2, 4), True),  # three dilations, halo larger than the plane
        (1, 2, 6, 5, 3, (1, 1100), True),  # halo over 1024: the direct kernels
        (2, 37, 90, 85, 3, (2, 81), True),  # halo 81: no staged tile fits, direct; channels_last in two groups
        (1, 33, 40, 45, 7, (1, 9), False),  # halo 27: channels_last takes fewer channels and a larger tile
    ],
)
def test_multi_dilation_dwconv2d(emu, dtype, channels_last, b, C, H, W, k, dilations, bias):
    inputs = conv_inputs(b, C, H, W, k=k, n_dilations=len(dilations), dtype=dtype, bias=bias)
    if channels_last:
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    check_against_reference(
        conv_op(emu), conv_reference, inputs, random_like(inputs["x"]), dtype,
        dilations=dilations,
    )  # fmt: skip


def test_multi_dilation_dwconv2d_views_and_a_99_kib_device(emu):
    """A strided view of x; 440 channels, k = 7: 43560 weight and bias sums, more than the 84-SM device's grid
    of 1344 blocks of 32 sums covers at once; k = 7 channels_last within the 99 KiB a block may have there, its
    tiles planned for two blocks per SM; b2 stage 1 in bfloat16 channels_last, whose default tile (53 KiB) is
    more than a quarter of that (k = 3: four blocks per SM)."""
    emu.configure(device=SMEM_99_KIB)
    try:
        inputs = conv_inputs(1, 96, 56, 56, k=3, dtype=torch.bfloat16)
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
        check_against_reference(conv_op(emu), conv_reference, inputs, random_like(inputs["x"]), torch.bfloat16)
        inputs = conv_inputs(1, 12, 30, 46, k=3)
        inputs["x"] = inputs["x"][:, :, :, ::2]
        check_against_reference(conv_op(emu), conv_reference, inputs, random_like(inputs["x"]), torch.float32)
        inputs = conv_inputs(1, 440, 3, 3, k=7)
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)  # 32 channels a block: 14 blocks, not 440
        check_against_reference(conv_op(emu), conv_reference, inputs, random_like(inputs["x"]), torch.float32)
        inputs = conv_inputs(1, 40, 40, 40, k=7)
        inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
        check_against_reference(
            conv_op(emu), conv_reference, inputs, random_like(inputs["x"]), torch.float32,
            dilations=(1, 3),
        )  # fmt: skip
    finally:
        emu.configure()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_multi_dilation_dwconv2d_channels_last_words_off_alignment(emu, dtype):
    """A channels_last 16-bit grad_out that starts one channel into its storage: its channel words straddle
    32-bit words, so the weight gradient reads them one channel at a time (load_unit), where an aligned tensor
    takes one 32-bit access per word."""
    inputs = conv_inputs(2, 10, 9, 7, k=3, dtype=dtype)
    inputs["x"] = inputs["x"].to(memory_format=torch.channels_last)
    grad = random_like(inputs["x"]).to(dtype)
    grad = torch.cat([grad[:, :1], grad], dim=1).contiguous(memory_format=torch.channels_last)[:, 1:]
    assert grad.data_ptr() % 4 == 2 and grad.stride(1) == 1
    check_against_reference(conv_op(emu), conv_reference, inputs, grad, dtype)


def padded_view(t: torch.Tensor, dim: int, size: int, channels_last: bool) -> torch.Tensor:
    """t as a view into a tensor `size` long along `dim`, the rest of it NaN (read it and the test fails)."""
    shape = list(t.shape)
    shape[dim] = size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    wide = torch.full(shape, float("nan"), dtype=t.dtype).contiguous(memory_format=memory_format)
    view = wide.narrow(dim, 0, t.shape[dim])
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_multi_dilation_dwconv2d_strided_views(emu, dtype):
    """x and grad_out as views, read through their strides (the test's copies keep them): the tile is staged in
    chunks of up to 16 bytes along the contiguous direction, aligned to the plane.
    - Padded rows (NCHW: 75 columns in rows of 80) or pixels (channels_last: 13 channels of 16): the chunks over
      the plane's last column or the last channel are read element by element, the padding (NaN) never. The
      tiles' edges inside the plane (at column 64, or every 16 pixels) cut chunks on both sides; dilation 3
      makes a halo of 3 columns.
    - Every other channel of a channels_last tensor (channel stride 2), with grad_out one value expanded to the
      whole shape (every stride 0, as sum().backward() gives): one element per load, through the strides."""
    for channels_last, (C, H, W), dim, size in [(False, (3, 9, 75), 3, 80), (True, (13, 20, 21), 1, 16)]:
        inputs = conv_inputs(2, C, H, W, k=3, dtype=dtype)
        inputs["x"] = padded_view(inputs["x"], dim, size, channels_last)
        grad = padded_view(random_like(inputs["x"]).to(dtype), dim, size, channels_last)
        check_against_reference(conv_op(emu), conv_reference, inputs, grad, dtype, dilations=(1, 3))
    inputs = conv_inputs(2, 10, 11, 9, k=3, dtype=dtype)
    inputs["x"] = inputs["x"].repeat_interleave(2, dim=1).contiguous(memory_format=torch.channels_last)[:, ::2]
    grad = torch.tensor(0.75, dtype=dtype).expand(inputs["x"].shape)
    assert inputs["x"].stride(1) == 2 and grad.stride() == (0, 0, 0, 0)
    check_against_reference(conv_op(emu), conv_reference, inputs, grad, dtype)


# ---- thread order --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_results_do_not_depend_on_thread_order(emu, dtype):
    """Each op run with its threads in index order, in reverse order and shuffled: bit-identical outputs, but
    for the scan backward's dA, dB, dC, dD, ddelta_bias, which are float atomic sums (order-dependent)."""
    ops = torch.ops.mamba_adaptor_emu
    scan = scan_inputs(b=1, dim=10, L=700, N=3, G=2, dtype=dtype)
    scan_args = [*scan.values(), True]
    gather = gather_inputs(1, 2, 17, 5000, 3, dtype=dtype, spread=300.0)
    conv = conv_inputs(1, 40, 30, 30, k=5, dtype=dtype)
    conv_cl = {**conv, "x": conv["x"].to(memory_format=torch.channels_last)}

    def outputs():
        results = list(ops.selective_scan_forward(*scan_args))
        for checkpoints in (None, results[1]):  # du, ddelta
            results += ops.selective_scan_backward(scan_grad(scan).to(dtype), *scan_args, False, checkpoints)[:2]
        results.append(ops.state_gather(*gather.values(), True, False))
        results += ops.state_gather_backward(
            random_like(gather["h"]).to(dtype), *gather.values(), True, False
        )
        for c in (conv, conv_cl):
            results.append(ops.multi_dilation_dwconv2d(*c.values(), [1, 2]))
            results += ops.multi_dilation_dwconv2d_backward(
                random_like(c["x"]).to(dtype), *c.values(), [1, 2]
            )
        return results

    try:
        emu.configure(schedule=FORWARD_ORDER)
        expected = outputs()
        for schedule, seed in [(REVERSE_ORDER, 0), (SHUFFLED, 1), (SHUFFLED, 2)]:
            emu.configure(schedule=schedule, seed=seed)
            for i, (a, b) in enumerate(zip(outputs(), expected)):
                assert torch.equal(a, b), f"output {i} differs between thread orders {schedule}/{seed} and 0"
    finally:
        emu.configure()


# ---- more than 2^31 elements ------------------------------------------------------------------------------


@contextlib.contextmanager
def far_end_only(emu, blocks: int):
    """Only the last `blocks` blocks of each launch run, and torch leaves new memory unfilled: a tensor of more
    than 2^31 elements costs only the pages those blocks touch (the rest stays unmapped zeros)."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    emu.configure(last_blocks=blocks)
    try:
        yield
    finally:
        emu.configure()
        torch.utils.deterministic.fill_uninitialized_memory = fill


def far_end_tensor(shape, region, gen: torch.Generator, dtype=torch.bfloat16, scale: float = 1.0,
                   memory_format=torch.contiguous_format) -> torch.Tensor:
    """An input for far_end_only's runs: torch.empty(shape) left unfilled (torch's deterministic mode would write
    every page, gigabytes here), so that its untouched pages stay unmapped zeros, with randn * scale in t[region]."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    part = t[region]
    part.copy_(torch.randn(part.shape, generator=gen) * scale)
    return t


@pytest.mark.parametrize("states", [False, True], ids=["y", "states"])
def test_selective_scan_past_2_pow_31_elements(emu, states):
    """u (1, 2^25 + 64, 64) or the states (1, 2^21 + 64, 16, 64), bfloat16, groups of 64 channels, run by their
    last blocks: the last 8 channels, all of their row offsets past 2^31, forward and backward against the CPU
    kernels on them alone. (dB and dC, summed by grid-stride kernels that the skipped blocks share, are the GPU
    test's.)"""
    L, per_group, n = 64, 64, 8
    dim, N = (2**21 + per_group, 16) if states else (2**25 + per_group, 1)
    gen = torch.Generator().manual_seed(0)

    def far_end(*shape, rows: int = n, dtype=torch.bfloat16, scale: float = 1.0):  # values in the last rows only
        region = (slice(None), slice(-rows, None)) if shape[0] == 1 else slice(-rows, None)
        return far_end_tensor(shape, region, gen, dtype, scale)

    inputs = dict(
        u=far_end(1, dim, L),
        delta=far_end(1, dim, L, scale=0.3),
        A=-torch.exp(0.5 * far_end(dim, N, dtype=torch.float32)),
        B=far_end(1, dim // per_group, N, L, rows=1),
        C=None if states else far_end(1, dim // per_group, N, L, rows=1),
        D=None if states else far_end(dim, dtype=torch.float32),
        delta_bias=0.5 * far_end(dim, dtype=torch.float32),
    )
    grad = far_end(1, dim, N, L) if states else far_end(1, dim, L)
    ops = torch.ops.mamba_adaptor_emu
    with far_end_only(emu, blocks=per_group):  # a block runs one or more channels of a group
        out = ops.selective_scan(*inputs.values(), True, False)
        grads = dict(zip(GRAD_NAMES, ops.selective_scan_backward(grad, *inputs.values(), True, False)))
    last = slice(dim - n, dim)
    assert out[:, last].storage_offset() >= 2**31
    group = {k: None if v is None else v[:, -1:] if k in "BC" else v[:, last] if v.dim() > 2 else v[last]
             for k, v in inputs.items()}  # fmt: skip
    ref_out, ref_grads = cpu_forward_backward(group, grad[:, last], True)
    assert_close_scaled("output", out[:, last], ref_out, 2e-2)
    for name, ref_g in zip(GRAD_NAMES, ref_grads):
        if ref_g is not None and name not in ("dB", "dC"):
            g = grads[name]
            assert_close_scaled(name, g[:, last] if g.dim() > 2 else g[last], ref_g, 2e-2)


def test_state_gather_past_2_pow_31_elements(emu):
    """h (1, 1, 145, 2^24 - 1) in bfloat16, the longest CUDA row, run by its last blocks (the backward's bucket
    sort, one block per (b, s), runs whole): the last row (its block's chunk of 16 rows starts past 2^31) at its
    last positions, forward and backward, against the reference on the last W positions, where everything
    but zeros lies, with the kernels' float32 positions (t + offset rounds to a multiple of 1 or 2 up there)."""
    D, L, K, W, n = 145, 2**24 - 1, 2, 4096, 32
    gen = torch.Generator().manual_seed(0)

    last = (..., slice(-W, None))  # everything but zeros lies in the last W positions
    h, grad = far_end_tensor((1, 1, D, L), last, gen), far_end_tensor((1, 1, D, L), last, gen)
    weights = far_end_tensor((1, 1, K, L), last, gen)
    weights[last] = weights[last].abs()
    offsets = torch.tensor([-2.75, 1.25]).view(1, 1, K, 1).expand(1, 1, K, L).to(torch.bfloat16)
    ops = torch.ops.mamba_adaptor_emu
    with far_end_only(emu, blocks=4):
        out = ops.state_gather(h, offsets, weights, True, False)
        grad_h, grad_offsets, grad_weights = ops.state_gather_backward(grad, h, offsets, weights, True, False)
    assert (D - 1) // 16 * 16 * L >= 2**31 and grad_h[0, 0, -1].storage_offset() >= 2**31

    # The window [L - W, L) as a sequence of its own, its offsets moved so that its positions are the kernels'.
    t = torch.arange(L - W, L)
    pos = t.float() + offsets[..., -W:].float()  # float32, as the kernels compute it
    window = dict(
        h=h[..., -W:].double().requires_grad_(),
        offsets=(pos.double() - t.double()).requires_grad_(),  # exact: position i of the window, t = L - W + i
        weights=weights[..., -W:].double().requires_grad_(),
    )
    expected = reference.state_gather(*window.values())
    expected.backward(grad[..., -W:].double())
    assert_close_scaled("output", out[0, 0, -1, -n:], expected[0, 0, -1, -n:], 2e-2)
    assert_close_scaled("grad_h", grad_h[0, 0, -1, -n:], window["h"].grad[0, 0, -1, -n:], 2e-2)
    for name, got in (("grad_offsets", grad_offsets), ("grad_weights", grad_weights)):
        assert_close_scaled(name, got[0, 0, :, -n:], window[name[5:]].grad[0, 0, :, -n:], 2e-2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_multi_dilation_dwconv2d_past_2_pow_31_elements(emu, channels_last):
    """x (1, 3, 33000, 33000) in bfloat16, run by its last block: the bottom-right corner (in NCHW the last plane
    starts past 2^31) of the output and of grad_x, against the reference on the last 64 x 64, where x and grad_out
    hold everything but zeros (3 x 3 weights, dilations 1 and 2: halo 2)."""
    C, H, W, P = 3, 33000, 33000, 64
    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    corner_patch = (..., slice(-P, None), slice(-P, None))  # everything but zeros lies in the last P x P
    x = far_end_tensor((1, C, H, W), corner_patch, gen, memory_format=layout)
    grad = far_end_tensor((1, C, H, W), corner_patch, gen, memory_format=layout)
    weight = (torch.randn(2, C, 3, 3, generator=gen) / 3).to(torch.bfloat16)
    ops = torch.ops.mamba_adaptor_emu
    with far_end_only(emu, blocks=1):
        out = ops.multi_dilation_dwconv2d(x, weight, None, [1, 2])
        grad_x = ops.multi_dilation_dwconv2d_backward(grad, x, weight, None, [1, 2])[0]
    corner = (0, -1, slice(-8, None), slice(-8, None))  # the last block's: the last channel (block), last tile
    assert out[corner].storage_offset() >= 2**31 and grad_x[corner].storage_offset() >= 2**31
    patch = x[..., -P:, -P:].double().requires_grad_()
    expected = reference.multi_dilation_dwconv2d(patch, weight.double(), None, (1, 2))
    expected.backward(grad[..., -P:, -P:].double())
    assert_close_scaled("output", out[corner], expected[corner], 2e-2)
    assert_close_scaled("grad_x", grad_x[corner], patch.grad[corner], 2e-2)


def test_multi_dilation_dwconv2d_past_2_pow_31_element_offsets_in_a_tile(emu):
    """x (1, 8, 14, 14) in bfloat16 whose channels lie 3.2 * 10^8 elements apart (a view of a 4.5 GB storage, only
    the pages of its elements touched): a block stages all 8 channels, so offsets within its tile pass 2^31 and
    staging takes 64-bit offsets. Output and every gradient against the reference."""
    C, H, W, channel_stride = 8, 14, 14, 320_000_000
    gen = torch.Generator().manual_seed(0)
    x = far_end_tensor(((C - 1) * channel_stride + H * W,), slice(0, 0), gen).as_strided(
        (1, C, H, W), (C * channel_stride, channel_stride, W, 1)
    )
    x.copy_(torch.randn(x.shape, generator=gen))
    inputs = dict(x=x, weight=(torch.randn(2, C, 3, 3, generator=gen) / 3).to(torch.bfloat16), bias=None)
    ops = torch.ops.mamba_adaptor_emu
    grad = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    out = ops.multi_dilation_dwconv2d(*inputs.values(), [1, 2])
    grads = ops.multi_dilation_dwconv2d_backward(grad, *inputs.values(), [1, 2])[:2]
    exact = {k: v.double().requires_grad_() for k, v in inputs.items() if v is not None}
    expected = reference.multi_dilation_dwconv2d(exact["x"], exact["weight"], None, (1, 2))
    expected.backward(grad.double())
    assert_close_scaled("output", out, expected, 2e-2)
    for name, got in zip(("x", "weight"), grads):
        assert_close_scaled(f"grad_{name}", got, exact[name].grad, 2e-2)


# ---- the paper's shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["b2-s1", "b2-s4"])
def test_paper_stage_shapes(emu, stage):
    """Each op at a b2 stage shape (batch 1, bfloat16), as the models and the benchmark run them: the scan
    over the four directions' channels with d_state 1, the gather with S = 4, K = 4, Adaptor-S channels_last."""
    from mamba_adaptor_ops.bench.ops import DIRECTIONS, POINTS, STAGES

    C, side = STAGES[stage]
    L, dtype = side * side, torch.bfloat16
    scan = scan_inputs(b=1, dim=DIRECTIONS * C, L=L, N=1, G=DIRECTIONS, dtype=dtype)
    check_against_reference(
        scan_op(emu), reference.selective_scan, scan, scan_grad(scan), dtype, delta_softplus=True
    )
    gather = gather_inputs(1, DIRECTIONS, C, L, POINTS, dtype=dtype)
    check_against_reference(gather_op(emu), reference.state_gather, gather, random_like(gather["h"]), dtype)
    conv = conv_inputs(1, C, side, side, k=3, dtype=dtype)
    conv["x"] = conv["x"].to(memory_format=torch.channels_last)
    check_against_reference(conv_op(emu), conv_reference, conv, random_like(conv["x"]), dtype)


# ---- output layouts ----------------------------------------------------------------------------------------


def test_outputs_have_the_fake_kernels_layouts(emu):
    """Every output of every op and backward op has the shape, strides and dtype of the CPU kernel's, which
    opcheck holds to the fake kernel's (what torch.compile plans memory with): on strided B, u with swapped
    strides, h transposed in memory, channels_last and transposed x."""
    cpu, emulated = torch.ops.mamba_adaptor, torch.ops.mamba_adaptor_emu
    calls = []
    for with_C in (True, False):
        scan = scan_inputs(b=2, dim=8, L=300, N=2, G=2, with_C=with_C, with_D=with_C)
        scan["u"] = scan["u"].transpose(0, 1).contiguous().transpose(0, 1)
        scan["B"] = scan["B"].transpose(2, 3).contiguous().transpose(2, 3)
        y, checkpoints = cpu.selective_scan_forward(*scan.values())
        calls += [(name, [*scan.values(), True, False]) for name in ("selective_scan", "selective_scan_forward")]
        for saved in (None, checkpoints.transpose(0, 1).contiguous().transpose(0, 1)):
            calls += [("selective_scan_backward", [torch.randn_like(y), *scan.values(), True, False, saved])]
    gather = gather_inputs(2, 3, 5, 40, 3)
    gather["h"] = gather["h"].transpose(2, 3).contiguous().transpose(2, 3)
    calls += [("state_gather", [*gather.values(), True, False])]
    calls += [("state_gather_backward", [torch.randn(gather["h"].shape), *gather.values(), True, False])]
    for layout in (torch.channels_last, "transposed"):
        conv = conv_inputs(2, 6, 9, 7, 3)
        x = conv["x"]
        conv["x"] = x.transpose(2, 3) if layout == "transposed" else x.contiguous(memory_format=layout)
        calls += [("multi_dilation_dwconv2d", [*conv.values(), [1, 2]])]
        calls += [("multi_dilation_dwconv2d_backward", [torch.randn(conv["x"].shape), *conv.values(), [1, 2]])]
    for name, args in calls:
        expected, got = getattr(cpu, name)(*args), getattr(emulated, name)(*args)
        expected, got = (expected, got) if isinstance(expected, (tuple, list)) else ([expected], [got])
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            want = None if e is None else (e.shape, e.stride(), e.dtype)
            assert want == (None if g is None else (g.shape, g.stride(), g.dtype)), f"{name} output {i}"


# ---- empty inputs ------------------------------------------------------------------------------------------


def test_empty_inputs(emu):
    """A zero-size batch, channel count or length: no launch (a grid of zero blocks is an invalid launch), empty
    outputs, and the weights' gradients written as zeros (new tensors are NaN-filled here) in both modes."""
    dtype = torch.bfloat16
    for b, dim, L in [(0, 4, 8), (2, 0, 8), (2, 4, 0)]:
        for N, with_C in [(1, True), (16, True), (1, False)]:
            scan = scan_inputs(b=b, dim=dim, L=L, N=N, G=2 if dim else 1, dtype=dtype, with_C=with_C)
            for deterministic in (False, True):
                op = functools.partial(scan_op(emu), deterministic=deterministic)
                check_against_reference(
                    op, reference.selective_scan, scan, scan_grad(scan), dtype, delta_softplus=True
                )
    for shape in [(0, 2, 4, 8, 3), (2, 2, 0, 8, 3), (2, 2, 4, 0, 3)]:
        gather = gather_inputs(*shape, dtype=dtype)
        for deterministic in (False, True):
            op = functools.partial(gather_op(emu), deterministic=deterministic)
            check_against_reference(op, reference.state_gather, gather, random_like(gather["h"]), dtype)
    for b, C, H, W in [(0, 4, 5, 5), (2, 0, 5, 5), (2, 4, 0, 5), (2, 4, 5, 0)]:
        for channels_last in (False, True):
            conv = conv_inputs(b, C, H, W, k=3, dtype=dtype)
            if channels_last:
                conv["x"] = conv["x"].to(memory_format=torch.channels_last)
            check_against_reference(conv_op(emu), conv_reference, conv, random_like(conv["x"]), dtype)


# ---- random shapes -----------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, derandomize=True)  # the same shapes in every CI run
@given(
    b=st.integers(1, 2),
    channels_per_group=st.integers(1, 20),  # above 8: several channel tiles per (batch, group)
    G=st.integers(1, 3),
    L=st.integers(1, 600),
    N=st.sampled_from([1, 2, 5, 16, 33]),
    states=st.booleans(),
    deterministic=st.booleans(),
    checkpoints=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_selective_scan_random_shapes(
    emu, b, channels_per_group, G, L, N, states, deterministic, checkpoints, dtype, seed
):
    inputs = scan_inputs(b=b, dim=G * channels_per_group, L=L, N=N, G=G, dtype=dtype, with_C=not states, seed=seed)
    check_against_reference(
        functools.partial(scan_op(emu, checkpoints), deterministic=deterministic),
        reference.selective_scan,
        inputs,
        scan_grad(inputs, seed),
        dtype,
        delta_softplus=True,
    )


def test_selective_scan_backward_sums_with_cancellation(emu):
    """A row whose ddelta_bias is -0.55 from 738 terms of 400 in total magnitude (found by the random test
    above): summed in float32 per segment and added with one atomic per segment, dA and ddelta_bias erred by
    4.5e-6 and 2.6e-6, over the 2x rule's 3.4e-6 and 2.4e-6; the double row sums give 2.6e-6 and 1.6e-6. This
    checks the sums, so with correctly rounded transcendentals: the GPU's, within their documented error, move
    ddelta_bias by up to 5.4e-6 (1.4e-8 of the terms' magnitude), more than the rule's 2.4e-6 allows here."""
    inputs = scan_inputs(b=2, dim=1, L=369, N=2, G=1, with_C=False, seed=8893)
    try:
        emu.configure(intrinsic_error=EXACT_MATH)
        check_against_reference(
            scan_op(emu),
            reference.selective_scan,
            inputs,
            scan_grad(inputs, 8893),
            torch.float32,
            delta_softplus=True,
        )
    finally:
        emu.configure()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    S=st.integers(1, 4),
    D=st.integers(1, 20),
    L=st.integers(1, 400),
    K=st.integers(1, 6),
    spread=st.sampled_from([0.5, 4.0, 100.0]),
    residual=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_state_gather_random_shapes(emu, b, S, D, L, K, spread, residual, dtype, seed):
    inputs = gather_inputs(b, S, D, L, K, dtype=dtype, spread=spread, seed=seed)
    grad = random_like(inputs["h"], seed)
    check_against_reference(gather_op(emu), reference.state_gather, inputs, grad, dtype, residual=residual)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    C=st.integers(1, 40),
    H=st.integers(1, 30),
    W=st.integers(1, 30),
    k=st.sampled_from([3, 5, 7]),
    dilations=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    bias=st.booleans(),
    layout=st.sampled_from(["nchw", "channels_last", "transposed", "padded"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_multi_dilation_dwconv2d_random_shapes(emu, b, C, H, W, k, dilations, bias, layout, dtype, seed):
    """x in one of four layouts: NCHW, channels_last, with H and W swapped in memory (column stride H), or rows
    padded by 3 columns (a view with gaps)."""
    inputs = conv_inputs(b, C, H, W, k, len(dilations), dtype, bias=bias, seed=seed)
    x = inputs["x"]
    if layout == "channels_last":
        inputs["x"] = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        inputs["x"] = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "padded":
        inputs["x"] = padded_view(x, 3, W + 3, channels_last=False)
    check_against_reference(
        conv_op(emu),
        conv_reference,
        inputs,
        random_like(inputs["x"], seed),
        dtype,
        dilations=tuple(dilations),
    )


# ---- the emulator itself -------------------------------------------------------------------------------------


def test_emulator_exposes_kernel_faults(emu):
    """What a GPU would get wrong, the emulator shows: a missing barrier (results change with the thread order),
    a barrier half the threads never reach, a shuffle from an exited lane, a launch over its shared memory, a
    read of unwritten shared memory (0xff bytes: NaN) and a block split between two __syncthreads."""
    try:
        emu.configure(schedule=FORWARD_ORDER)
        assert emu.selftest(0)[0] == 0
        in_order = emu.selftest(0)[2]
        emu.configure(schedule=REVERSE_ORDER)
        assert not torch.equal(emu.selftest(0)[2], in_order), "a missing barrier went unnoticed"
    finally:
        emu.configure()
    status, message, _ = emu.selftest(1)
    assert status == 2 and "cannot go on" in message, message
    status, message, _ = emu.selftest(2)
    assert status == 2 and "exited" in message, message
    status, message, _ = emu.selftest(3)
    assert status == 1 and "dynamic shared memory" in message, message
    status, message, out = emu.selftest(4)
    assert status == 0 and out[:32].isnan().all(), message
    status, message, _ = emu.selftest(8)
    assert status == 2 and "a block must meet at one __syncthreads" in message, message


def test_transcendentals_err_as_on_a_gpu(emu):
    """The scan's exp2f, __expf (softplus) and __logf (softplus of 16-bit inputs) err within the GPU's
    documented bounds, not as the CPU's correctly rounded ones: float32 outputs move, by a few ulp per step."""
    outputs, L = {}, 64
    try:
        for mode in (EXACT_MATH, SPREAD_ERROR, UP_ERROR, DOWN_ERROR):
            emu.configure(intrinsic_error=mode)
            for dtype in (torch.float32, torch.bfloat16):
                inputs = scan_inputs(b=1, dim=4, L=L, N=2, G=1, dtype=dtype)
                outputs[mode, dtype] = scan_op(emu)(**inputs, delta_softplus=True).float()
    finally:
        emu.configure()
    for dtype, step in ((torch.float32, 1.2e-7), (torch.bfloat16, 7.8e-3)):  # a few ulp, or one bfloat16 ulp
        exact = outputs[EXACT_MATH, dtype]
        for mode in (SPREAD_ERROR, UP_ERROR, DOWN_ERROR):
            change = (outputs[mode, dtype] - exact).abs().max().item()
            assert change <= L * step * exact.abs().max().item(), (mode, dtype, change)
            assert change > 0 or dtype == torch.bfloat16, (mode, dtype)  # bfloat16 outputs may round it away
    assert (outputs[UP_ERROR, torch.float32] != outputs[DOWN_ERROR, torch.float32]).any()


def test_setup_errors_say_what_to_do(emu):
    """The two CUDA errors that come from the user's setup, not from the call, name the cause and the fix: a
    driver older than the CUDA the kernels were built with, and a GPU they were not built for."""
    calls = [
        lambda: scan_op(emu)(**scan_inputs(b=1, dim=4, L=8, N=1, G=1, dtype=torch.float32, with_C=True)),
        lambda: gather_op(emu)(**gather_inputs(1, 2, 4, 8, 2, dtype=torch.float32)),
        lambda: conv_op(emu)(**conv_inputs(1, 4, 5, 5, 3, dtype=torch.float32)),
    ]
    old_driver = r"built with CUDA 1\d\.\d, the installed NVIDIA driver supports CUDA 12\.8 at most: update"
    no_image = (
        r"no kernel image .* This GPU is sm_75; the kernels were built for 80-real,90-real,90-virtual\. "
        r".* MAMBA_ADAPTOR_CUDA_ARCHS=75-real pip install"
    )
    try:
        for call in calls:
            emu.configure(device=OLD_DRIVER)
            with pytest.raises(RuntimeError, match=old_driver):
                call()
            emu.configure(device=T4)
            with pytest.raises(RuntimeError, match=no_image):
                call()
            emu.configure()
            call()  # and the emulator is usable again
    finally:
        emu.configure()


# ---- memory traffic: what the kernels move through DRAM, counted (tests/cuda_emu/traffic.py) ------------


@pytest.fixture(scope="module")
def traffic():
    """The emulator's traffic build; its ops live in their own namespace, next to the plain build's."""
    return TrafficCounter(emu_build.build(variant="traffic"))


def sector_bytes(tensors) -> int:
    """The bytes of the distinct 32-byte sectors that the tensors' storage spans."""
    sectors = set()
    for t in tensors:
        first = t.untyped_storage().data_ptr()
        sectors.update(range(first // 32, (first + t.untyped_storage().nbytes() - 1) // 32 + 1))
    return 32 * len(sectors)


# How coalesced each forward's warp requests are at least (the fewest sectors they need over the sectors they
# touch, divergent requests left out; b2 stage 1), by element size. The scan's float32 lanes load their 8
# timesteps as two 16-byte vectors, so each request touches 32 sectors and uses half of each (the next request
# reads the other half from L1). The convolution stages its tile in 16-byte chunks; in NCHW, 16-bit outputs are
# stored 2 bytes per lane with lanes along x, and row ends split a warp's run.
FORWARD_COALESCING = {
    "selective_scan": {4: 0.5, 2: 0.99},
    "state_gather": {4: 0.99, 2: 0.99},
    "multi_dilation_dwconv2d NCHW": {4: 0.99, 2: 0.74},
    "multi_dilation_dwconv2d NHWC": {4: 0.99, 2: 0.98},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_forward_reads_its_inputs_once_and_writes_its_output_once(traffic, dtype):
    """Each op's forward, on the paper's b2 stage-1 shapes (batch 1; the scan also with d_state 16), is one kernel
    whose global memory accesses touch exactly the sectors of its inputs, read, and of its output, written: one
    pass over memory at DRAM's granularity, nothing read outside the tensors (and the counter sees no shared
    memory, no stack, no parameters); its warps' requests are as coalesced as FORWARD_COALESCING says."""
    for case in stage_cases(list(OPS), ["b2-s1"], 1, [dtype], "cpu"):
        inputs = case.make_inputs()
        forward, _ = traffic.op_calls(case, deterministic=False, inputs=inputs)
        output, (launch,) = traffic.count(forward)
        expected = (sector_bytes(inputs.values()), sector_bytes([output]))
        assert (launch.unique_read, launch.unique_written) == expected, (case.op, case.shape, launch)
        name = f"{case.op} {case.shape.split()[-1]}" if case.op == "multi_dilation_dwconv2d" else case.op
        bound = FORWARD_COALESCING[name][dtype.itemsize]
        assert launch.requests.coalescing >= bound, (name, dtype, launch.requests, sorted(
            launch.sites, key=lambda site: site.ideal_sectors - site.sectors)[:3])


# The backward's DRAM traffic over the fewest bytes it must move (inputs read once, outputs written once: the
# benchmark's count) on b2 stage 1, bfloat16, batch 1 (the ratios do not depend on the batch): the bound, and in
# the comment what the kernels moved when it was set and where the excess comes from.
BACKWARD_TRAFFIC = {
    # 1.041: float32 dB, dC sums (memset, atomics, conversion); deterministic 1.208: one float32 dB, dC row per
    # channel tile of 8 channels.
    ("selective_scan b2-s1", False): 1.06,
    ("selective_scan b2-s1", True): 1.23,
    # 1.513: grad_out read twice (grad_points_kernel, grad_h_kernel), the buckets of the samples (0.11)
    ("state_gather b2-s1", False): 1.55,
    # 1.345 / 1.467: grad_out read twice (grad of x, grad of the weights), float32 partial weight sums per tile
    ("multi_dilation_dwconv2d b2-s1 NCHW", False): 1.37,
    ("multi_dilation_dwconv2d b2-s1 NHWC", False): 1.49,
}


def test_traffic_backward_within_its_bound(traffic):
    """Each op's backward moves no more than its bound over the fewest bytes it must move (BACKWARD_TRAFFIC): a
    change that reads or writes more (a wider workspace, a grad read a third time) fails here, without a GPU."""
    cases = {f"{case.op} {case.shape}": case for case in stage_cases(list(OPS), ["b2-s1"], 1, [torch.bfloat16], "cpu")}
    for (name, deterministic), bound in BACKWARD_TRAFFIC.items():
        forward, backward = traffic.op_calls(cases[name], deterministic)
        grad = torch.randn_like(forward())
        ratio = sum(launch.unique for launch in traffic.count(backward, grad)[1]) / cases[name].bytes_bwd
        assert 1 <= ratio <= bound, (name, deterministic, ratio)


def test_traffic_channels_last_wide_halo(traffic):
    """A channels_last Adaptor-S whose halo (24: k = 7, dilation 8) does not fit the default tile of 16 x 16 pixels
    by 32 channels: the tiling that reads the fewest sectors per output (fewer channels, a larger tile) keeps the
    sectors its requests touch, what the SMs fetch from L2, within 17x the input (the default tile shrunk to 8 x 8
    pixels touched 64x; the tile is staged as float32, so it holds half the pixels a bfloat16 staging would)."""
    x = torch.randn(1, 64, 64, 64, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(2, 64, 7, 7, dtype=torch.bfloat16)
    _, launches = traffic.count(traffic.ops.multi_dilation_dwconv2d, x, weight, None, [1, 8])
    ratio = sum(launch.requests.sectors for launch in launches) * 32 / (x.numel() * x.element_size())
    assert ratio <= 17, ratio


# ---- sanitizers: the emulator's memcheck and racecheck -------------------------------------------------

# Per sanitizer: g++'s runtime libraries to preload into a fresh Python, and its options variable. libstdc++ is
# preloaded with ASan: its interceptor of C++ throws needs it from the start (else a C++ extension that throws
# while being imported, as triton's does in torch 2.14, stops ASan).
SANITIZER_RUNTIMES = {
    "address": (["libasan.so", "libstdc++.so"], "ASAN_OPTIONS", "detect_leaks=0"),
    "thread": (["libtsan.so"], "TSAN_OPTIONS", "halt_on_error=0"),
}
# The kernels' tests; thread orders and traffic add nothing here, and a sanitizer's shadow of the > 2^31-element
# tensors would cost minutes.
KERNEL_TESTS = "not emulator_exposes and not thread_order and not past_2_pow and not traffic"


class SanitizedRun:
    """`python args...` started in a fresh Python whose emulator is built with `sanitizer` ("address" or
    "thread"), its runtime preloaded; output and the sanitizer's reports go to files in `logs`."""

    def __init__(self, sanitizer: str, logs: Path, *args: str):
        names, variable, options = SANITIZER_RUNTIMES[sanitizer]
        runtimes = [
            subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in names
        ]
        if not all(map(os.path.isabs, runtimes)):
            pytest.skip(f"no {sanitizer} sanitizer runtime for g++")
        emu_build.build(variant=sanitizer)  # here, so that a build error shows as such
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        env = {
            **os.environ,
            "MAMBA_EMU_SANITIZER": sanitizer,
            "LD_PRELOAD": " ".join(runtimes),
            variable: f"{options} log_path={logs / 'report'}",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(EMU_DIR)]),
            # torch's worker threads synchronise in code TSan cannot see (libgomp): one thread, no false reports.
            "OMP_NUM_THREADS": "1",
        }
        with open(logs / "output.txt", "w") as output:
            self.process = subprocess.Popen(
                [sys.executable, *args], env=env, stdout=output, stderr=subprocess.STDOUT, cwd=Path(__file__).parent
            )

    def wait(self) -> tuple[int, str]:
        """The exit status, and the end of the output with the sanitizer's reports."""
        status = self.process.wait()
        reports = "".join(path.read_text() for path in sorted(self.logs.glob("report*")))
        return status, (self.logs / "output.txt").read_text()[-4000:] + reports


@pytest.fixture(scope="module")
def sanitized_kernel_tests(tmp_path_factory):
    """The kernel tests above, run again under each sanitizer: both runs at once, one per core."""
    runs = {}
    for sanitizer in SANITIZER_RUNTIMES:
        try:
            runs[sanitizer] = SanitizedRun(
                sanitizer, tmp_path_factory.mktemp(sanitizer),
                "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", KERNEL_TESTS,
            )  # fmt: skip
        except pytest.skip.Exception as skipped:
            runs[sanitizer] = skipped
    yield runs
    for run in runs.values():
        if isinstance(run, SanitizedRun) and run.process.poll() is None:
            run.process.kill()


def finished(runs: dict, sanitizer: str) -> tuple[int, str]:
    run = runs[sanitizer]
    if not isinstance(run, SanitizedRun):
        pytest.skip(str(run))
    return run.wait()


@pytest.mark.skipif(SANITIZER is not None, reason="this is the sanitized run's launcher")
def test_kernels_under_address_sanitizer(sanitized_kernel_tests, tmp_path):
    """The kernel tests with AddressSanitizer and UBSan's alignment check: any read or write outside a tensor or
    a block's shared memory, or off its type's alignment, is an error. The emulator's memcheck."""
    status, output = finished(sanitized_kernel_tests, "address")
    assert status == 0, f"sanitized run failed:\n{output}"

    # ... and the sanitized build does catch a misaligned vector load (which a GPU faults on).
    script = "import test_cuda_emulated as t, build; t.Emulator(build.build(variant='address')).selftest(5)"
    status, output = SanitizedRun("address", tmp_path, "-c", script).wait()
    assert status != 0 and "misaligned address" in output, output


@pytest.mark.skipif(SANITIZER is not None, reason="this is the sanitized run's launcher")
def test_kernels_under_thread_sanitizer(sanitized_kernel_tests, tmp_path):
    """The kernel tests with ThreadSanitizer, every emulated thread a fiber that only barriers, __syncwarp and
    launch boundaries order (emu.cpp's race): any access to shared or global memory that another thread of the
    launch, in its block or another, writes with no barrier between them and not both atomic, is an error. The
    emulator's racecheck (compute-sanitizer's covers shared memory only)."""
    status, output = finished(sanitized_kernel_tests, "thread")
    assert status == 0 and "ThreadSanitizer" not in output, f"sanitized run failed:\n{output}"

    # ... and it does report a race in shared memory and one between blocks in global memory, but not the same
    # exchanges ordered by __syncwarp, __syncthreads and atomics.
    script = (
        "import test_cuda_emulated as t, build\n"
        "e = t.Emulator(build.build(variant='thread'))\n"
        "for which in (0, 6, 7): assert e.selftest(which)[0] == 0"
    )
    status, output = SanitizedRun("thread", tmp_path, "-c", script).wait()
    assert status != 0 and output.count("WARNING: ThreadSanitizer: data race") == 2, output
    assert "unsynchronised_broadcast" in output and "racy_global_sum" in output, output
    assert "synchronised_exchange" not in output, output
