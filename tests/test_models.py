"""The model layer: sizes against the paper, the timm-style API, the booster, transfer learning, checkpoint
conversion, a training step and torch.compile."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mamba_adaptor_ops as mao
from mamba_adaptor_ops.flops import count_macs
from mamba_adaptor_ops.models import (
    VMamba,
    adaptor_parameters,
    convert_vmamba_checkpoint,
    count_parameters,
    create_model,
    default_cfgs,
    freeze_backbone,
    insert_adaptors,
    list_models,
    load_checkpoint,
    paper_sizes,
    register_timm_models,
)

# The paper's sizes: params (M) and GFLOPs counted as multiply-accumulates, at 224 x 224.
PAPER = {"vmamba_tiny": (30.25, 4.9), "mamba_adaptor_b1": (7.8, 1.4), "mamba_adaptor_b2": (32.0, 5.4)}
BOOSTER = (3.2, 6.1)  # Table 3: % more params and FLOPs on VMamba-T
TRANSFER_TRAINABLE_M = 1.68  # Table 4: adaptors + head on VMamba-T


def _size(model: torch.nn.Module) -> tuple[float, float]:
    x = torch.empty(1, 3, 224, 224, device="meta")
    return count_parameters(model) / 1e6, count_macs(model.eval(), x) / 1e9


@pytest.fixture(scope="module")
def sizes() -> dict[str, tuple[float, float]]:
    """(params M, GMACs) of every model and of the booster, counted once on the meta device."""
    out = {}
    with torch.device("meta"):
        for name in PAPER:
            out[name] = _size(create_model(name))
        booster = insert_adaptors(create_model("vmamba_tiny"), form="parallel")
        out["booster"] = _size(booster)
        out["transfer_trainable"] = (freeze_backbone(booster) / 1e6, 0.0)
    return out


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_macs_match_the_paper(sizes, name):
    params, gmacs = sizes[name]
    paper_params, paper_gmacs = PAPER[name]
    assert abs(params / paper_params - 1) <= 0.05, f"{name}: {params:.2f}M params vs {paper_params}M"
    assert abs(gmacs / paper_gmacs - 1) <= 0.10, f"{name}: {gmacs:.3f} GMACs vs {paper_gmacs}"
    assert paper_sizes[name] == PAPER[name]


# The fields of timm's PretrainedCfg (timm 1.0): timm.models.register_model builds one from each default_cfgs entry,
# and an unknown key fails the registration (as `paper=` did with timm 1.0.x).
TIMM_PRETRAINED_CFG_FIELDS = {
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag", "custom_load",
    "input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset", "label_names", "label_descriptions",
    "pool_size", "test_pool_size", "first_conv", "classifier", "license", "description", "origin_url",
    "paper_name", "paper_ids", "notes",
}  # fmt: skip


@pytest.mark.parametrize("name", list(PAPER))
def test_default_cfgs_use_only_timm_fields(name):
    assert set(default_cfgs[name]) <= TIMM_PRETRAINED_CFG_FIELDS, set(default_cfgs[name]) - TIMM_PRETRAINED_CFG_FIELDS


def test_booster_and_transfer_sizes(sizes):
    (p0, f0), (p1, f1) = sizes["vmamba_tiny"], sizes["booster"]
    assert abs(100 * (p1 / p0 - 1) - BOOSTER[0]) <= 0.5
    assert abs(100 * (f1 / f0 - 1) - BOOSTER[1]) <= 1.0
    assert abs(sizes["transfer_trainable"][0] / TRANSFER_TRAINABLE_M - 1) <= 0.10


def test_flop_formulas_are_registered_for_forward_and_backward():
    b, S, D, K, L, N = 2, 4, 3, 5, 7, 2
    h = torch.randn(b, S, D, L, requires_grad=True)
    offsets, weights = torch.randn(b, S, K, L), torch.rand(b, S, K, L)
    x, w = torch.randn(b, D, 6, 5, requires_grad=True), torch.randn(2, D, 3, 3)
    u, delta, A, B = torch.randn(b, S * D, L), torch.rand(b, S * D, L), -torch.rand(S * D, N), torch.randn(b, S, N, L)
    with FlopCounterMode(display=False) as counter:
        mao.state_gather(h, offsets, weights).sum().backward()
        mao.multi_dilation_dwconv2d(x, w, None, (1, 2)).sum().backward()
        mao.selective_scan(u, delta, A, B, B, torch.ones(S * D))
        mao.selective_scan(u, delta, A, B, None)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    gather = 2 * K * b * S * D * L
    assert counts["mamba_adaptor.state_gather"] == 2 * gather
    assert counts["mamba_adaptor.state_gather_backward"] == 2 * 3 * gather
    conv = 2 * 9 * b * D * 30
    assert counts["mamba_adaptor.multi_dilation_dwconv2d"] == 2 * conv
    assert counts["mamba_adaptor.multi_dilation_dwconv2d_backward"] == 2 * 2 * conv
    assert counts["mamba_adaptor.selective_scan"] == 2 * (9 * b * S * D * N * L + b * S * D * L + 8 * b * S * D * N * L)


def test_create_model_registry_and_errors():
    assert {"vmamba_tiny", "mamba_adaptor_b1", "mamba_adaptor_b2"} <= set(list_models())
    assert list_models("mamba_adaptor_*") == ["mamba_adaptor_b1", "mamba_adaptor_b2"]
    with pytest.raises(ValueError, match="unknown model 'vmamba_huge'; known models: mamba_adaptor_b1"):
        create_model("vmamba_huge")
    with pytest.raises(ValueError, match="pass checkpoint_path"):
        create_model("mamba_adaptor_b1", pretrained=True)
    with pytest.raises(ValueError, match="out_indices \\[4\\] out of range"):
        create_model("mamba_adaptor_b1", features_only=True, out_indices=(1, 4))


def _tiny(**kwargs) -> VMamba:
    """VMamba's structure at a size that runs in milliseconds."""
    return create_model("vmamba_tiny", dims=16, depths=(1, 1, 2, 1), **kwargs)


def test_classifier_api():
    torch.manual_seed(0)
    model = _tiny(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 48)
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, 2, 2) and model.num_features == 128
    assert model(x).shape == (2, 7) and model.num_classes == 7
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(model.get_classifier()(pooled), model(x))
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(3, global_pool="")
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128, 2, 2)
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(3, global_pool="token")
    final, inter = model.forward_intermediates(x, indices=2)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1] for t in inter] == [64, 128]
    assert {"stem.conv1.bias", "stages.0.blocks.0.ssm.A_logs"} <= model.no_weight_decay()
    assert "stages.0.blocks.0.ssm.in_proj.weight" not in model.no_weight_decay()
    assert model.pretrained_cfg["architecture"] == "vmamba_tiny" and model.pretrained_cfg["num_classes"] == 1000


def test_features_only_returns_the_four_stage_maps():
    model = create_model("mamba_adaptor_b1", features_only=True).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(1, 48, 16, 24), (1, 96, 8, 12), (1, 192, 4, 6), (1, 384, 2, 3)]
    assert model.feature_info.channels() == [48, 96, 192, 384]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name(1) == "stages.1"
    assert model.num_classes == 0
    two = _tiny(features_only=True, out_indices=(1, -1)).eval()
    assert [m.shape[1] for m in two(x)] == [32, 128] and two.feature_info.channels() == [32, 128]
    with pytest.raises(ValueError, match="features_only model has no classifier"):
        two.reset_classifier(10)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _tiny(num_classes=4, drop_path_rate=0.0, adaptor={"num_points": 2})
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_booster_leaves_the_output_unchanged_and_then_trains():
    torch.manual_seed(0)
    model = _tiny(num_classes=5).eval()
    _perturb(model)  # a "pretrained" model
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = model(x)
    base = count_parameters(model)
    assert insert_adaptors(model) is model and model.adaptor.form == "parallel"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    added = count_parameters(model) - base
    assert added == sum(p.numel() for _, p in adaptor_parameters(model)) > 0

    trainable = freeze_backbone(model)
    assert trainable == added + 128 * 5 + 5
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in adaptor_parameters(model)
    } | {"head.weight", "head.bias"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), before)
    with pytest.raises(ValueError, match="already has adaptors"):
        insert_adaptors(model)
    with pytest.raises(ValueError, match="has no SS2D/VimMixer block"):
        insert_adaptors(torch.nn.Linear(2, 2))


# The official VMamba names (MzeroMiko/VMamba classification/models/vmamba.py, vmamba_tiny_s1l8) of this
# library's modules, written out independently of the converter's rules.
def _to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stem = {"stem.conv1.": "patch_embed.0.", "stem.norm1.": "patch_embed.2.", "stem.conv2.": "patch_embed.5.",
            "stem.norm2.": "patch_embed.7.", "norm.": "classifier.norm.", "head.": "classifier.head."}
    out = {}
    for name, value in state_dict.items():
        new = next((o + name[len(p):] for p, o in stem.items() if name.startswith(p)), None)
        if new is None:
            parts = name.split(".")  # stages.i.(blocks.j.<module>|downsample.<conv|norm>).<...>
            i = int(parts[1])
            if parts[2] == "downsample":
                new = ".".join([f"layers.{i - 1}.downsample", {"conv": "1", "norm": "3"}[parts[3]], *parts[4:]])
            else:
                module = {"norm1": "norm", "ssm": "op"}.get(parts[4], parts[4])
                new = ".".join([f"layers.{i}.blocks.{parts[3]}", module, *parts[5:]])
        if value.ndim == 2 and any(k in name for k in ("in_proj", "out_proj", "mlp.fc")):
            value = value[:, :, None, None]  # VMamba's Linear2d weights stored as 1x1 convolutions
        out[new] = value.clone()
    return out


def test_vmamba_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = _tiny(num_classes=10).eval()
    _perturb(source)
    official = _to_official(source.state_dict())
    assert "layers.2.blocks.1.op.x_proj_weight" in official and "layers.0.downsample.1.weight" in official
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)

    target = _tiny(num_classes=10).eval()
    target.load_state_dict(convert_vmamba_checkpoint({"model": official, "epoch": 3}, target))
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected)

    save_file({k: v.contiguous() for k, v in official.items()}, tmp_path / "official.safetensors")
    torch.save({"model": official, "config": {"depths": [1, 1, 2, 1]}}, tmp_path / "official.pth")
    torch.save(source.state_dict(), tmp_path / "ours.pth")
    for file in ("official.safetensors", "official.pth", "ours.pth"):
        loaded = create_model("vmamba_tiny", dims=16, depths=(1, 1, 2, 1), num_classes=10,
                              checkpoint_path=str(tmp_path / file)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)

    boosted = insert_adaptors(_tiny(num_classes=3))  # adaptors and a new head stay fresh
    missing, unexpected = load_checkpoint(boosted, tmp_path / "official.safetensors")
    assert unexpected == [] and {k.split(".")[0] for k in missing if "parallel" not in k} == {"head"}


class Opaque:
    """A pickled object that torch.load(weights_only=True) refuses, as the official checkpoints' configs."""


def test_vmamba_checkpoint_errors(tmp_path):
    with torch.device("meta"):
        full = _to_official(create_model("vmamba_tiny").state_dict())
    assert len(convert_vmamba_checkpoint(full)) == len(full)  # onto vmamba_tiny by default

    broken = dict(full)
    del broken["layers.2.blocks.7.op.A_logs"]
    broken["layers.2.blocks.8.op.A_logs"] = full["layers.2.blocks.7.op.A_logs"]
    broken["pos_embed"] = full["classifier.head.bias"]
    with pytest.raises(KeyError, match=r"missing keys \(1\): \[stages.2.blocks.7.ssm.A_logs\]; unexpected keys "
                                       r"\(2\): \[.*pos_embed.*\]"):
        convert_vmamba_checkpoint(broken)
    with torch.device("meta"):
        small = _to_official(_tiny().state_dict())
    with pytest.raises(ValueError, match="stages.0.blocks.0.ssm.in_proj.weight has shape"):
        convert_vmamba_checkpoint({**full, "layers.0.blocks.0.op.in_proj.weight": small["layers.0.blocks.0.op.in_proj.weight"]})

    torch.save({"model": {}, "extra": Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(RuntimeError, match="pass weights_only=False"):
        load_checkpoint(_tiny(), tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(_tiny(), tmp_path / "absent.pth")


def test_cpu_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = create_model("mamba_adaptor_b1", num_classes=4, drop_path_rate=0.0)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
    assert final < losses[0] - 0.05, (losses, final)


def test_compile_b1_forward_and_backward_fullgraph():
    """Dynamo captures b1 in one graph (fullgraph) and AOTAutograd traces its backward; aot_eager skips
    Inductor's code generation, which takes minutes on 2 cores and is not what is being tested here."""
    torch.manual_seed(0)
    model = create_model("mamba_adaptor_b1", num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    params = list(model.parameters())
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_timm_registration(monkeypatch):
    """With a timm importable, the factories go into its registry (a stand-in timm.models here)."""
    registry = {"resnet50": None}
    timm_models = types.ModuleType("timm.models")
    timm_models.is_model = lambda name: name in registry
    timm_models.register_model = lambda fn: registry.setdefault(fn.__name__, fn)
    timm = types.ModuleType("timm")
    timm.models = timm_models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", timm_models)
    assert register_timm_models() == list_models()
    model = registry["mamba_adaptor_b1"](pretrained=False, pretrained_cfg=None, num_classes=3, features_only=True)
    assert isinstance(model, VMamba) and model.features_only
