"""Model registry: `register_model` for factories, `create_model(name, **kwargs)` and `list_models`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a model factory under its function name (a decorator, as timm's)."""
    if fn.__name__ in _model_entrypoints:
        raise ValueError(f"register_model: a model named {fn.__name__!r} is already registered")
    _model_entrypoints[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style `pattern`, sorted."""
    return sorted(name for name in _model_entrypoints if fnmatch.fnmatch(name, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The factory of model `name`; raises ValueError naming the known models otherwise."""
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _model_entrypoints[name]


def create_model(
    name: str, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs
) -> nn.Module:
    """Builds model `name` with its factory's keyword arguments (num_classes, drop_path_rate, adaptor,
    features_only, out_indices, ...), as timm.create_model does. `checkpoint_path` loads a checkpoint file
    (safetensors or torch; this library's layout or the official VMamba one) after building. No weights
    are hosted: `pretrained=True` raises and says to pass `checkpoint_path`."""
    factory = model_entrypoint(name)
    if pretrained:
        raise ValueError(
            f"create_model({name!r}, pretrained=True): no pretrained weights are hosted for this library; "
            "download a checkpoint and pass checkpoint_path=<file> instead"
        )
    model = factory(**kwargs)
    if checkpoint_path is not None:
        from .vmamba import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model


__all__ = ["create_model", "list_models", "model_entrypoint", "register_model"]
