"""Autocast of the ops: what ``torch.ops.mamba_adaptor.*`` does inside ``torch.autocast``.

Under autocast, torch's own layers hand the next op tensors of mixed dtypes (a Linear's bfloat16 output next to a
float32 parameter), which the kernels, wanting one dtype, would reject. Each op therefore has an autocast rule, as
torch's ops do, registered for the AutocastCPU and AutocastCUDA dispatch keys (what
``torch.library.register_autocast`` registers, with a rule per argument instead of one dtype for all):

- ``multi_dilation_dwconv2d``: x, weight and bias in the autocast dtype, as ``conv2d``'s rule has them;
- ``state_gather``: h, offsets and weights in the widest of their dtypes, as ``grid_sampler``'s rule has them, so
  that no sampling position is rounded to 16 bits unless it already was;
- ``selective_scan`` and ``selective_scan_forward``: u, delta, B and C in the autocast dtype, as the recurrent
  cells' rules (``lstm_cell``, ``gru_cell``) have them; A, D and delta_bias in float32, which the op requires.

As with torch's rules, only floating tensors on the autocast's device are cast, never float64 ones; the casts are
differentiable, so gradients return in each input's own dtype. The backward ops need no rule: they receive the
dtypes their forward saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_DEVICE_TYPES = ("cpu", "cuda")


def autocast_enabled(args: Sequence) -> bool:
    """Whether autocast is on for the device of the first tensor in args."""
    device = next((a.device.type for a in args if isinstance(a, Tensor)), None)
    return device in _DEVICE_TYPES and torch.is_autocast_enabled(device)


def _eligible(t, device_type: str) -> bool:
    return (
        isinstance(t, Tensor) and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64
    )


def to_autocast_dtype(args: Sequence, device_type: str) -> list:
    """args with each eligible tensor in the autocast dtype of device_type."""
    dtype = torch.get_autocast_dtype(device_type)
    return [a.to(dtype) if _eligible(a, device_type) else a for a in args]


def to_widest_dtype(args: Sequence, device_type: str) -> list:
    """args with each eligible tensor in the widest floating dtype among them (torch.promote_types)."""
    tensors = [a for a in args if _eligible(a, device_type)]
    if not tensors:
        return list(args)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [a.to(dtype) if _eligible(a, device_type) else a for a in args]


def scan_autocast(args: Sequence, device_type: str) -> list:
    """selective_scan's args: the sequences u, delta, B, C in the autocast dtype, the parameters A, D, delta_bias
    in float32."""
    u, delta, A, B, C, D, delta_bias, *flags = args
    u, delta, B, C = to_autocast_dtype((u, delta, B, C), device_type)
    A, D, delta_bias = (t.float() if _eligible(t, device_type) else t for t in (A, D, delta_bias))
    return [u, delta, A, B, C, D, delta_bias, *flags]


def register_autocast(name: str, cast: Callable[[Sequence, str], list]) -> None:
    """Registers cast(args, device_type) -> args as the autocast rule of op `name` ("mamba_adaptor::op") on the CPU
    and CUDA: under autocast for that device, the op runs on the cast args with autocast off."""
    namespace, op_name = name.split("::")
    op = getattr(getattr(torch.ops, namespace), op_name).default
    for device_type in _DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        rule = _rule(op, cast, device_type, key)
        # The dispatcher's kernel, and the same rule for tracing through Python (torch.compile, make_fx).
        _LIBRARY.impl(op_name, lambda _keyset, *args, rule=rule, **kwargs: rule(*args, **kwargs), key_name,
                      with_keyset=True)
        op.py_impl(key)(rule)


def _rule(op, cast: Callable[[Sequence, str], list], device_type: str, key) -> Callable:
    schema = op._schema.arguments

    def rule(*args, **kwargs):
        # Every argument in schema order: callers leave out trailing defaults or pass some by name.
        args = [*args, *(kwargs.get(a.name, a.default_value) for a in schema[len(args) :])]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast(args, device_type))

    return rule


_LIBRARY = torch.library.Library("mamba_adaptor", "IMPL")
