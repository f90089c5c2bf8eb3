"""Autograd of the ops: one backward formula per op, reached two ways.

``register_autograd`` registers it with torch (``torch.library.register_autograd``): what a direct
``torch.ops.mamba_adaptor.*`` call, ``torch.compile`` and ``opcheck`` use. It also returns the eager entry point
of the op's Python function, which reaches the same formula through a plain ``torch.autograd.Function``, for
less Python per call: on 2 CPU cores, torch 2.13, a tiny scan's forward while recording the graph took 42 us
through the registered autograd and 26 us through the Function, forward + backward 163 us and 144 us.
Without grad, and under autocast (whose rule casts the args first, _autocast.py), the op is called directly.

The backward ops (``op_backward``) are not differentiable: their registered autograd raises a clear error when
a second backward (a gradient of a gradient, after ``create_graph=True``) reaches them, where torch would
otherwise treat their outputs as constants and give a silently wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._autocast import autocast_enabled


def needs_grad(args) -> bool:
    """Whether an op call on args records a backward."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def register_autograd(name: str, backward: Callable, setup_context: Callable, guard_backward_op: bool = True) -> Callable:
    """Registers `backward` and `setup_context` as the autograd of op `name` ("mamba_adaptor::op"), and returns
    call(*args): the op on args (its schema's arguments, in order), recording its backward when needed. With
    `guard_backward_op`, the autograd of the backward op `name`_backward raises on a second backward."""
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    if guard_backward_op:
        torch.library.register_autograd(f"{name}_backward", _no_double_backward(name), setup_context=_no_context)
    namespace, op_name = name.split("::")
    op = getattr(getattr(torch.ops, namespace), op_name).default

    # forward(ctx, ...) rather than a setup_context staticmethod: torch takes a slower path (the one
    # register_autograd's Function takes) for the latter. Named after the op (selective_scan: SelectiveScan),
    # its graph nodes read SelectiveScanBackward.
    def forward(ctx, *args):
        out = op(*args)
        setup_context(ctx, args, out)
        return out

    class_name = "".join(word.capitalize() for word in op_name.split("_"))
    members = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    Function = type(class_name, (torch.autograd.Function,), members)

    def call(*args):
        # Under autocast the op's autocast rule (_autocast.py) casts the args before its registered autograd
        # records them; the Function would record the uncast ones.
        if needs_grad(args) and not torch.compiler.is_compiling() and not autocast_enabled(args):
            return Function.apply(*args)
        return op(*args)

    return call


def _no_context(ctx, inputs, output) -> None:
    pass


def _no_double_backward(name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name}: its backward is not differentiable; a second backward through it (the gradient of a "
            "gradient, e.g. after autograd.grad(..., create_graph=True)) is not supported"
        )

    return backward
