"""A small forward + backward of every op on CUDA in every dtype, for compute-sanitizer (tools/gpu_check.sh).

Shapes are small and odd on purpose (partial tiles, tails) and reach every kernel path: the scan over one
segment of L (with d_state 1, several rows per warp) and several (the backward from the forward's checkpoints and
from its own first pass), with and without C, d_state 1 and 16, `deterministic` on and off; the gather with rows that
fit in shared memory and rows tiled with halos, 16-byte and element staging, expanded weights, offsets reaching
outside the sequence and NaN; the convolution staged with the default tile, with the tile a wide channels_last halo
takes, and direct (a halo no staged tile fits), in NCHW and channels_last.

    python tools/sanitizer_smoke.py [--device cpu]   # cpu: the same calls on the CPU kernels (a dry run)
"""

from __future__ import annotations

import argparse

import torch

import mamba_adaptor_ops as mao


def scan_cases(device: str, dtype: torch.dtype) -> None:
    b, dim, G = 2, 24, 2  # 12 channels per group: the short-row kernels' warps take 1 to 3 rows
    for L in (37, 300):  # one segment of L (with d_state 1: the short-row kernels), and several (checkpoints)
        for N, with_C in ((1, True), (16, True), (1, False)):
            for deterministic in (False, True):
                u = torch.randn(b, dim, L, device=device, dtype=dtype, requires_grad=True)
                delta = torch.rand(b, dim, L, device=device, dtype=dtype, requires_grad=True)
                A = (-torch.rand(dim, N, device=device)).requires_grad_()
                B = torch.randn(b, G, N, L, device=device, dtype=dtype, requires_grad=True)
                C = torch.randn(b, G, N, L, device=device, dtype=dtype, requires_grad=True) if with_C else None
                D = torch.randn(dim, device=device, requires_grad=True) if with_C else None
                # The public function's backward starts from the forward's checkpoints; the op's own autograd
                # (L = 300: also) from a first pass of the backward.
                for scan in (mao.selective_scan, torch.ops.mamba_adaptor.selective_scan)[: 1 + (L > 37)]:
                    y = scan(u, delta, A, B, C, D, torch.rand(dim, device=device), True, deterministic=deterministic)
                    y.float().square().sum().backward()


def gather_cases(device: str, dtype: torch.dtype) -> None:
    # L = 33: a row in shared memory, element staging; 4096 and 4001: rows longer than the window, in tiles with
    # halos (16-byte and element staging), samples far outside the tile read global memory.
    for L, spread in ((33, 20.0), (4096, 1500.0), (4001, 1500.0)):
        for deterministic in (False, True):
            h = torch.randn(2, 2, 5, L, device=device, dtype=dtype, requires_grad=True)
            offsets = (torch.randn(2, 2, 3, L, device=device) * spread).to(dtype)
            offsets[0, 0, 0, 3] = float("nan")
            offsets.requires_grad_()
            weights = torch.rand(2, 2, 3, L, device=device, dtype=dtype, requires_grad=True)
            out = mao.state_gather(h, offsets, weights, deterministic=deterministic)
            out.float().nan_to_num().sum().backward()
    h = torch.randn(2, 2, 5, 33, device=device, dtype=dtype, requires_grad=True)
    offsets = torch.randn(2, 2, 3, 33, device=device, dtype=dtype, requires_grad=True)
    shared = torch.rand(1, 2, 3, 1, device=device, dtype=dtype, requires_grad=True)  # expanded, stride 0
    mao.state_gather(h, offsets, shared.expand(2, 2, 3, 33)).float().sum().backward()


def conv_cases(device: str, dtype: torch.dtype) -> None:
    # (3, (1, 2)): the default tile; (7, (1, 17)): channels_last's tile search for a wide halo; (3, (1, 81)): a halo
    # no staged tile fits, the direct kernels.
    for k, dilations in ((3, (1, 2)), (7, (1, 3, 5)), (7, (1, 17)), (3, (1, 81))):
        for channels_last in (False, True):
            x = torch.randn(2, 7, 13, 11, device=device, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            weight = torch.randn(len(dilations), 7, k, k, device=device, dtype=dtype, requires_grad=True)
            bias = torch.randn(7, device=device, dtype=dtype, requires_grad=True)
            mao.multi_dilation_dwconv2d(x, weight, bias, dilations).float().square().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        scan_cases(device, dtype)
        gather_cases(device, dtype)
        conv_cases(device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitizer smoke: all ops ran forward and backward")


if __name__ == "__main__":
    main()
