"""VMamba and Mamba-Adaptor (b1, b2): image classifiers and dense-prediction backbones, timm-style.

VMamba-T is VMamba's `vmamba_tiny_s1l8` (v05_noz SS2D, d_state 1, ssm_ratio 1, two-conv stem, 3x3 stride-2
downsampling, LayerNorm2d, channel-first); Mamba-Adaptor b1/b2 are the same network with the adaptors in
the sequential form (Mamba-Adaptor, CVPR 2025, Table 1). Sections: configs, blocks, the model class,
checkpoint filtering/conversion (the official VMamba layout included), factories.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..nn import SS2D, AdaptorConfig, AdaptorMixer, AdaptorT, LayerNorm2d, Mlp2d, ParallelAdaptor
from ._features import FeatureInfo
from ._registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "stem.conv1",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


#: Per model: input/normalisation metadata, in the fields of timm's PretrainedCfg only (timm builds one from each).
default_cfgs: dict[str, dict[str, Any]] = {
    "vmamba_tiny": _cfg(paper_name="VMamba-T (Mamba-Adaptor Table 3)"),
    "mamba_adaptor_b1": _cfg(paper_name="Mamba-Adaptor-b1 (Table 1)"),
    "mamba_adaptor_b2": _cfg(paper_name="Mamba-Adaptor-b2 (Table 1)"),
}

#: Per model: the paper's size, (params in millions, GMACs at 224^2).
paper_sizes: dict[str, tuple[float, float]] = {
    "vmamba_tiny": (30.25, 4.9),
    "mamba_adaptor_b1": (7.8, 1.4),
    "mamba_adaptor_b2": (32.0, 5.4),
}


# ---------------------------------------------------------------------------------------------- blocks


class DropPath(nn.Module):
    """Stochastic depth: zeroes a sample's residual branch with probability `drop_prob` while training and
    rescales the kept ones by 1 / (1 - drop_prob). forward(x): (b, ...) -> (b, ...)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Stem(nn.Module):
    """VMamba's v2 patch embedding: two 3x3 stride-2 convolutions. (b, in_chans, H, W) -> (b, dim, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """VMamba's v3 downsampling: a 3x3 stride-2 convolution and LayerNorm. (b, C, H, W) -> (b, C', H/2, W/2)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class VSSBlock(nn.Module):
    """VMamba's visual state-space block: x + drop_path(SS2D(norm1(x))), then x + drop_path(MLP(norm2(x))).

    forward(x): (b, dim, H, W) -> (b, dim, H, W). `adaptor` configures the SS2D's adaptors (None: VMamba).
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        mlp_ratio: float = 4.0,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        adaptor: AdaptorConfig | None = None,
        norm_layer: Callable[[int], nn.Module] = LayerNorm2d,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.ssm = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, adaptor=adaptor)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp2d(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ssm(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VMambaStage(nn.Module):
    """One resolution: [Downsample] then `depth` VSSBlocks. (b, in_dim, H, W) -> (b, dim, H/s, W/s), s = 2
    with downsampling, else 1."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, drop_path: Sequence[float], downsample: bool, **block_kwargs: Any
    ) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(VSSBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)))
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


# ---------------------------------------------------------------------------------------------- model


class VMamba(nn.Module):
    """VMamba (channel-first, v05_noz) with optional Mamba-Adaptor adaptors in every SS2D.

    forward(x): (b, in_chans, H, W) -> logits (b, num_classes); with ``features_only=True`` a list of the
    stage maps in `out_indices` instead, (b, dims[i], H / 2^(i+2), W / 2^(i+2)) NCHW (strides 4, 8, 16, 32).
    H and W need not be multiples of 32 (the strided convolutions round up).

    depths, dims: blocks and channels per stage (an int `dims` doubles per stage). d_state, ssm_ratio,
    dt_rank, d_conv: SS2D's scan (dt_rank "auto" = ceil(dim / 16)). mlp_ratio: MLP width. drop_rate: dropout
    before the classifier; drop_path_rate: stochastic depth, linear over the blocks. adaptor: an
    AdaptorConfig (or its fields as a dict) for every SS2D, or None for plain VMamba.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: int | Sequence[int] = 96,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        adaptor: AdaptorConfig | dict | str | None = None,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        depths = tuple(depths)
        num_stages = len(depths)
        dims = tuple(dims * 2**i for i in range(num_stages)) if isinstance(dims, int) else tuple(dims)
        if len(dims) != num_stages:
            raise ValueError(f"VMamba: dims needs one value per stage ({num_stages}), got {len(dims)}")
        self.adaptor = AdaptorConfig.make(adaptor)
        self.dims, self.depths = dims, depths
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.pretrained_cfg: dict[str, Any] = {}

        self.stem = Stem(in_chans, dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        block_kwargs = dict(
            mlp_ratio=mlp_ratio, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv,
            adaptor=self.adaptor,
        )
        self.stages = nn.Sequential()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(
                VMambaStage(
                    dims[max(i - 1, 0)], dims[i], depth, rates[first : first + depth], downsample=i > 0, **block_kwargs
                )
            )
        self.feature_info = FeatureInfo(
            {"num_chs": dims[i], "reduction": 4 * 2**i, "module": f"stages.{i}", "index": i} for i in range(num_stages)
        )

        self.features_only = features_only
        if features_only:
            indices = tuple(int(i) for i in out_indices)
            bad = [i for i in indices if not -num_stages <= i < num_stages]
            if bad:
                raise ValueError(f"VMamba: out_indices {bad} out of range for {num_stages} stages")
            self.out_indices = tuple(sorted({i % num_stages for i in indices}))
            self.feature_info = FeatureInfo(self.feature_info[i] for i in self.out_indices)
            self.norm = nn.Identity()
            self.num_classes, self.global_pool = 0, ""
            self.head_drop, self.head = nn.Identity(), nn.Identity()
        else:
            self.out_indices = tuple(range(num_stages))
            self.norm = LayerNorm2d(self.num_features)
            self.head_drop = nn.Dropout(drop_rate)
            self.reset_classifier(num_classes, global_pool)
        self.init_weights()

    # -- initialisation and optimiser helpers

    def init_weights(self) -> None:
        """VMamba's initialisation: linear weights truncated-normal(0.02), biases 0, norms 1/0; the scan's own
        parameters by Mamba's rule; the adaptors by their own rules (e.g. zero output projections)."""

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(init)
        for module in self.modules():
            if isinstance(module, (AdaptorT, AdaptorMixer)):
                module.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameter names an optimiser should not decay: the scan's A_logs and Ds, Adaptor-T's shared
        coefficients, every norm and bias (VMamba's rule)."""
        skip = {"A_logs", "Ds", "shared_coef"}
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name.rsplit(".", 1)[-1] in skip}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each block's activations in the backward instead of storing them."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    # -- classifier

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier by a fresh `num_classes`-way linear layer (0: none, forward returns the
        pooled features); `global_pool` "avg", "max" or "" (no pooling: forward_head returns the map)."""
        if self.features_only:
            raise ValueError("reset_classifier: a features_only model has no classifier; build one without it")
        if global_pool is not None:
            if global_pool not in ("avg", "max", ""):
                raise ValueError(f"reset_classifier: global_pool must be 'avg', 'max' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            self.head.to(device=self.norm.weight.device, dtype=self.norm.weight.dtype)

    # -- forward

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The stage maps in `indices` (an int n: the last n stages; default: all) and the final map.

        x (b, in_chans, H, W) -> (final (b, num_features, h, w) after the final norm, [stage maps NCHW]);
        only the list with `intermediates_only`. `norm` applies the final norm to the last stage's map,
        `stop_early` skips the stages after the last one asked for (only with `intermediates_only`).
        """
        num_stages = len(self.stages)
        if indices is None:
            take = list(range(num_stages))
        elif isinstance(indices, int):
            take = list(range(num_stages - indices, num_stages))
        else:
            take = sorted(i % num_stages for i in indices)
        last = max(take) if stop_early and intermediates_only else num_stages - 1
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == num_stages - 1 else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: Tensor) -> Tensor:
        """(b, in_chans, H, W) -> the normalised last stage map (b, num_features, H/32, W/32)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(b, num_features, h, w) -> logits (b, num_classes), or the pooled features with `pre_logits`."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        elif self.global_pool == "max":
            x = x.amax(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True)
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------- checkpoint filtering/conversion

# Official VMamba (MzeroMiko/VMamba classification/models/vmamba.py, channel-first v05_noz models such as
# vmamba_tiny_s1l8) -> this file. SS2D keeps VMamba's parameter names, so only the containers move.
_VMAMBA_KEY_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^patch_embed\.0\.", lambda m: "stem.conv1."),
        (r"^patch_embed\.2\.", lambda m: "stem.norm1."),
        (r"^patch_embed\.5\.", lambda m: "stem.conv2."),
        (r"^patch_embed\.7\.", lambda m: "stem.norm2."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.norm\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.norm1."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.op\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.ssm."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.(norm2|mlp)\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.{m[3]}."),
        (r"^layers\.(\d+)\.downsample\.1\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.conv."),
        (r"^layers\.(\d+)\.downsample\.3\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.norm."),
        (r"^classifier\.norm\.", lambda m: "norm."),
        (r"^classifier\.head\.", lambda m: "head."),
    ]
]
_OFFICIAL_PREFIXES = ("patch_embed.", "layers.", "classifier.")


def unwrap_state_dict(checkpoint: dict[str, Any], key: str | None = None) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: `checkpoint[key]` (default: "model", then "state_dict", as the
    official training code and common trainers save them), with a DDP "module." prefix removed."""
    if key is not None:
        if key not in checkpoint:
            raise KeyError(f"checkpoint has no entry {key!r}; its entries: {sorted(checkpoint)[:20]}")
        checkpoint = checkpoint[key]
    else:
        for candidate in ("model", "state_dict"):
            if isinstance(checkpoint.get(candidate), dict):
                checkpoint = checkpoint[candidate]
                break
    state_dict = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if not state_dict:
        raise ValueError("checkpoint holds no tensors; pass key=<entry> naming the state dict inside it")
    return state_dict


def _rename_official(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Official VMamba names -> this file's; returns (renamed tensors, names no rule matches)."""
    renamed, unmatched = {}, []
    for name, value in state_dict.items():
        for pattern, rule in _VMAMBA_KEY_RULES:
            match = pattern.match(name)
            if match:
                renamed[rule(match) + name[match.end():]] = value
                break
        else:
            unmatched.append(name)
    return renamed, unmatched


def _fit_shape(value: Tensor, target: Tensor) -> Tensor:
    """VMamba stores some Linear2d weights as 1x1 convolutions (out, in, 1, 1): reshape those."""
    if value.shape != target.shape and value.numel() == target.numel():
        return value.reshape(target.shape)
    return value


def _is_adaptor_key(name: str, model: nn.Module) -> bool:
    """Whether parameter/buffer `name` belongs to an adaptor (which a VMamba checkpoint cannot hold)."""
    parts = name.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        if isinstance(model.get_submodule(".".join(parts[:i])), (AdaptorT, AdaptorMixer, ParallelAdaptor)):
            return True
    return False


def _key_report(missing: Sequence[str], unexpected: Sequence[str], limit: int = 12) -> str:
    def show(keys: Sequence[str]) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    return f"missing keys ({len(missing)}): [{show(missing)}]; unexpected keys ({len(unexpected)}): [{show(unexpected)}]"


def convert_vmamba_checkpoint(state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Maps an official VMamba checkpoint (vmamba_tiny_s1l8 layout: patch_embed.*, layers.i.blocks.j.op.*,
    layers.i.downsample.*, classifier.*) onto this library's `vmamba_tiny` (or onto `model`, e.g. another
    depth, or one with adaptors) and returns the new state dict. Accepts the file's whole dict ("model" /
    "state_dict" entries and DDP prefixes are unwrapped) and VMamba's 1x1-conv weights (out, in, 1, 1) of
    Linear2d layers. Raises KeyError listing the missing and unexpected keys when the checkpoint does not
    fit the model (adaptor keys are never missing: a VMamba checkpoint has none), ValueError naming a
    tensor whose shape differs."""
    if model is None:
        with torch.device("meta"):
            model = vmamba_tiny()
    target = model.state_dict()
    renamed, unexpected = _rename_official(unwrap_state_dict(state_dict))
    unexpected += [k for k in renamed if k not in target]
    converted = {}
    for name, value in renamed.items():
        if name in target:
            converted[name] = _fit_shape(value, target[name])
            if converted[name].shape != target[name].shape:
                raise ValueError(
                    f"convert_vmamba_checkpoint: {name} has shape {tuple(value.shape)}, the model needs "
                    f"{tuple(target[name].shape)}; build the model with the checkpoint's config"
                )
    missing = [k for k in target if k not in converted and not _is_adaptor_key(k, model)]
    if missing or unexpected:
        raise KeyError(
            "convert_vmamba_checkpoint: the checkpoint does not fit the model: " + _key_report(missing, unexpected)
        )
    return converted


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VMamba) -> dict[str, Tensor]:
    """A checkpoint (this library's layout or the official VMamba one) made ready for `model`: unwrapped,
    renamed when official, Linear2d weights reshaped, and the classifier and final norm dropped when the
    model has none or a different number of classes (the model keeps its fresh head, as timm does)."""
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith(_OFFICIAL_PREFIXES) for k in state_dict):
        renamed, unmatched = _rename_official(state_dict)
        state_dict = {**renamed, **{k: state_dict[k] for k in unmatched}}
    target = model.state_dict()
    out = {}
    for name, value in state_dict.items():
        if name in target:
            value = _fit_shape(value, target[name])
        if name.startswith(("head.", "norm.")) and (name not in target or target[name].shape != value.shape):
            continue
        out[name] = value
    return out


def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """Reads a checkpoint file: safetensors (by the .safetensors suffix) or torch.save output, on the CPU.

    `weights_only=False` allows torch files that pickle Python objects (the official VMamba checkpoints
    store their config); only use it on files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_checkpoint: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        if weights_only:
            raise RuntimeError(
                f"read_checkpoint: {path} holds more than tensors ({error}); if you trust the file, pass "
                "weights_only=False"
            ) from error
        raise


def load_checkpoint(
    model: VMamba, path: str | Path, strict: bool = True, weights_only: bool = True
) -> tuple[list[str], list[str]]:
    """Loads a checkpoint file (safetensors or torch; this library's layout or the official VMamba one)
    into `model` through `checkpoint_filter_fn`. With `strict`, keys the model needs are required except the
    adaptors' and the classifier's (a VMamba checkpoint has no adaptors; a new head stays fresh); raises
    KeyError listing missing and unexpected keys. Returns (missing, unexpected)."""
    state_dict = checkpoint_filter_fn(read_checkpoint(path, weights_only), model)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.") and not _is_adaptor_key(k, model)]
    if strict and (missing or result.unexpected_keys):
        raise KeyError(f"load_checkpoint({path}): " + _key_report(missing, result.unexpected_keys))
    return list(result.missing_keys), list(result.unexpected_keys)


# ---------------------------------------------------------------------------------------------- factories


def _create(name: str, defaults: dict[str, Any], kwargs: dict[str, Any]) -> VMamba:
    kwargs.pop("pretrained_cfg", None)  # passed by timm.create_model
    kwargs.pop("pretrained_cfg_overlay", None)
    model = VMamba(**{**defaults, **kwargs})
    model.pretrained_cfg = {**default_cfgs[name], "architecture": name}
    return model


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T (`vmamba_tiny_s1l8`): dims 96, depths 2-2-8-2, d_state 1, ssm_ratio 1; 30.2M params, 4.9 GMACs."""
    return _create("vmamba_tiny", dict(depths=(2, 2, 8, 2), dims=96, drop_path_rate=0.2), kwargs)


@register_model
def mamba_adaptor_b1(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Mamba-Adaptor-b1: dims 48, depths 2-2-6-2, sequential adaptors (learnable Adaptor-T, K = 4; Adaptor-S
    with dilations 1, 2); 7.6M params, 1.4 GMACs. `adaptor=dict(...)` overrides single fields (Table 5)."""
    defaults = dict(depths=(2, 2, 6, 2), dims=48, drop_path_rate=0.1, adaptor=AdaptorConfig())
    return _create("mamba_adaptor_b1", defaults, kwargs)


@register_model
def mamba_adaptor_b2(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Mamba-Adaptor-b2: VMamba-T's network with sequential adaptors; 32.8M params, 5.4 GMACs.
    `adaptor=dict(...)` overrides single fields (Table 5)."""
    defaults = dict(depths=(2, 2, 8, 2), dims=96, drop_path_rate=0.2, adaptor=AdaptorConfig())
    return _create("mamba_adaptor_b2", defaults, kwargs)


__all__ = [
    "DropPath",
    "VMamba",
    "VSSBlock",
    "checkpoint_filter_fn",
    "convert_vmamba_checkpoint",
    "default_cfgs",
    "load_checkpoint",
    "mamba_adaptor_b1",
    "mamba_adaptor_b2",
    "paper_sizes",
    "read_checkpoint",
    "unwrap_state_dict",
    "vmamba_tiny",
]
