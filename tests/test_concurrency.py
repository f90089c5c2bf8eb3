"""The ops called from several Python threads at once (a threaded data pipeline or inference server, or
DataParallel's one thread per GPU) give the bits each gives alone: no kernel keeps state between calls."""

from __future__ import annotations

import threading

import pytest
import torch
from test_multi_dilation_dwconv2d import make_inputs as conv_inputs
from test_selective_scan import make_inputs as scan_inputs
from test_state_gather import make_inputs as gather_inputs

import mamba_adaptor_ops as mao
from helpers import DEVICES, run_with_grads


def forward_and_grads(seed: int, device: str) -> list[torch.Tensor]:
    """Each op's output and input gradients on inputs drawn from `seed`."""
    x = conv_inputs(2, 16, 30, 30, 3, device=device, seed=seed)
    x["x"] = x["x"].to(memory_format=torch.channels_last)
    calls = [
        (mao.selective_scan, scan_inputs(b=2, dim=16, L=300, N=4, G=2, device=device, seed=seed),
         dict(delta_softplus=True)),
        (mao.state_gather, gather_inputs(2, 4, 24, 200, 4, device=device, seed=seed), {}),
        (mao.multi_dilation_dwconv2d, x, {}),
    ]  # fmt: skip
    results = []
    for op, inputs, kwargs in calls:
        # Each op's output has the shape of its first input (u, h, x).
        grad_out = torch.ones_like(next(iter(inputs.values())))
        out, grads = run_with_grads(op, inputs, grad_out, **kwargs)
        results += [out, *grads.values()]
    return results


@pytest.mark.parametrize("device", DEVICES)
def test_ops_from_several_threads_at_once(device):
    alone = {seed: forward_and_grads(seed, device) for seed in range(4)}
    mismatches = []

    def run(seed: int) -> None:
        for _ in range(5):
            for got, expected in zip(forward_and_grads(seed, device), alone[seed]):
                if not torch.equal(got, expected):
                    mismatches.append(seed)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches, f"results changed under concurrent calls (seeds {sorted(set(mismatches))})"
