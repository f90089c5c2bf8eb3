"""The paper's networks, built as timm builds models: `create_model("mamba_adaptor_b1", num_classes=10)`.

Models: `vmamba_tiny` (VMamba-T, the baseline), `mamba_adaptor_b1`, `mamba_adaptor_b2` (sequential adaptors).
Adapting a pretrained VMamba: `convert_vmamba_checkpoint` / `load_checkpoint`, `insert_adaptors` (the
booster) and `freeze_backbone` (transfer learning). When timm is importable the factories are also
registered with timm (`timm.create_model("mamba_adaptor_b1")` after importing this package).
"""

from __future__ import annotations

import importlib.util
import warnings

from ._features import FeatureInfo
from ._registry import create_model, list_models, model_entrypoint, register_model
from .adaptation import adaptor_parameters, count_parameters, freeze_backbone, insert_adaptors
from .vmamba import (
    VMamba,
    checkpoint_filter_fn,
    convert_vmamba_checkpoint,
    default_cfgs,
    load_checkpoint,
    mamba_adaptor_b1,
    mamba_adaptor_b2,
    paper_sizes,
    read_checkpoint,
    vmamba_tiny,
)


def register_timm_models() -> list[str]:
    """Registers this library's factories with timm's registry (`timm.models.register_model`); returns the
    names registered. Raises ImportError without timm. A name timm already knows is left to timm."""
    from timm.models import is_model
    from timm.models import register_model as timm_register_model

    registered = []
    for name in list_models():
        if not is_model(name):
            timm_register_model(model_entrypoint(name))
            registered.append(name)
    return registered


if importlib.util.find_spec("timm") is not None:
    try:
        register_timm_models()
    except Exception as error:  # a timm without the registry API this uses: ours keeps working
        warnings.warn(f"mamba_adaptor_ops.models: not registered with timm: {error}", stacklevel=2)

__all__ = [
    "FeatureInfo",
    "VMamba",
    "adaptor_parameters",
    "checkpoint_filter_fn",
    "convert_vmamba_checkpoint",
    "count_parameters",
    "create_model",
    "default_cfgs",
    "freeze_backbone",
    "insert_adaptors",
    "list_models",
    "load_checkpoint",
    "mamba_adaptor_b1",
    "mamba_adaptor_b2",
    "model_entrypoint",
    "paper_sizes",
    "read_checkpoint",
    "register_model",
    "register_timm_models",
    "vmamba_tiny",
]
