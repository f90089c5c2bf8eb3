"""Adapting pretrained backbones: the booster (Table 3) and transfer learning (Tables 4, 6).

`insert_adaptors` adds adaptors to every scan block of a built (e.g. pretrained) model; in the parallel form
the output is unchanged at insertion. `freeze_backbone` then leaves only the adaptors and the classifier
trainable, the paper's transfer-learning protocol.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..nn import AdaptorConfig, AdaptorMixer, AdaptorT, MultiScan, ParallelAdaptor

_ADAPTOR_TYPES = (AdaptorT, AdaptorMixer, ParallelAdaptor)


def insert_adaptors(
    model: nn.Module, form: Literal["parallel", "sequential"] = "parallel", **fields: Any
) -> nn.Module:
    """Adds adaptors to every scan block (SS2D, VimMixer) of `model`, in place, and returns `model`.

    form: "parallel" (the booster: a side branch per block, weight-sharing Adaptor-T coefficients, zero
    output projection: the output is unchanged at insertion) or "sequential" (inside the blocks; changes
    the output, for training on). `fields` are further AdaptorConfig fields (positions, num_points,
    dilations, kernel_size, hidden_ratio). The new modules take each block's device and dtype. Raises
    ValueError when `model` has no scan block or already has adaptors.
    """
    cfg = AdaptorConfig(form=form, **fields)
    blocks = [m for m in model.modules() if isinstance(m, MultiScan)]
    if not blocks:
        raise ValueError(f"insert_adaptors: {type(model).__name__} has no SS2D/VimMixer block to adapt")
    for block in blocks:
        block.add_adaptors(cfg)
    if hasattr(model, "adaptor"):
        model.adaptor = cfg
    return model


def adaptor_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adaptor parameter of `model` (Adaptor-T, Adaptor-S and its projection,
    the parallel branches)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _ADAPTOR_TYPES):
            names.update(f"{prefix}.{name}" for name, _ in module.named_parameters())
    return [(name, p) for name, p in model.named_parameters() if name in names]


def freeze_backbone(model: nn.Module, train_head: bool = True) -> int:
    """Transfer learning (Tables 4, 6): freezes every parameter of `model` except the adaptors' and, with
    `train_head`, the classifier's (`model.get_classifier()`). Returns the number of trainable parameters.

    Insert the adaptors (`insert_adaptors`) and resize the classifier (`reset_classifier`) first; the
    frozen parameters keep requires_grad=False, so build the optimiser from the trainable ones.
    """
    trainable = {id(p) for _, p in adaptor_parameters(model)}
    if train_head:
        if not hasattr(model, "get_classifier"):
            raise ValueError(f"freeze_backbone: {type(model).__name__} has no get_classifier(); pass train_head=False")
        trainable.update(id(p) for p in model.get_classifier().parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["adaptor_parameters", "count_parameters", "freeze_backbone", "insert_adaptors"]
