"""A small forward + backward of every op on CUDA in every dtype, for compute-sanitizer (tools/gpu_check.sh).

Shapes are odd on purpose (partial tiles, tails), offsets reach outside the sequence and include NaN.
"""

from __future__ import annotations

import torch

import mamba_adaptor_ops as mao


def main() -> None:
    device = "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N, with_C in ((1, True), (16, True), (1, False)):
            b, dim, L, G = 2, 12, 37, 3
            u = torch.randn(b, dim, L, device=device, dtype=dtype, requires_grad=True)
            delta = torch.rand(b, dim, L, device=device, dtype=dtype, requires_grad=True)
            A = (-torch.rand(dim, N, device=device)).requires_grad_()
            B = torch.randn(b, G, N, L, device=device, dtype=dtype, requires_grad=True)
            C = torch.randn(b, G, N, L, device=device, dtype=dtype, requires_grad=True) if with_C else None
            D = torch.randn(dim, device=device, requires_grad=True) if with_C else None
            y = mao.selective_scan(u, delta, A, B, C, D, torch.rand(dim, device=device), True)
            y.float().square().sum().backward()

        for deterministic in (False, True):
            h = torch.randn(2, 4, 5, 33, device=device, dtype=dtype, requires_grad=True)
            offsets = (torch.randn(2, 4, 3, 33, device=device) * 20).to(dtype)
            offsets[0, 0, 0, 3] = float("nan")
            offsets.requires_grad_()
            weights = torch.rand(2, 4, 3, 33, device=device, dtype=dtype, requires_grad=True)
            out = mao.state_gather(h, offsets, weights, deterministic=deterministic)
            out.float().nan_to_num().sum().backward()

        for channels_last in (False, True):
            for k, dilations in ((3, (1, 2)), (7, (1, 3, 5))):
                x = torch.randn(2, 7, 13, 11, device=device, dtype=dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                x.requires_grad_()
                weight = torch.randn(len(dilations), 7, k, k, device=device, dtype=dtype, requires_grad=True)
                bias = torch.randn(7, device=device, dtype=dtype, requires_grad=True)
                mao.multi_dilation_dwconv2d(x, weight, bias, dilations).float().square().sum().backward()
    torch.cuda.synchronize()
    print("sanitizer smoke: all ops ran forward and backward")


if __name__ == "__main__":
    main()
