"""timm models: split through timm's API, sign handling read off the producing module, clear refusals, lazy import,
and `timm:<name>` specs built from local checkpoints (state dict, safetensors, timm's training checkpoint)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from phpn_core.errors import UnsupportedModelError
from phpn_core.models.spec import ModelSpec, build_model, model_fingerprint
from phpn_core.models.split import SILU_SHIFT, split_classifier, supported_timm_families

timm = pytest.importorskip("timm")
torch.set_num_threads(2)


def _logits_close(model: nn.Module, x: torch.Tensor) -> float:
    features, weight, bias = split_classifier(model)
    with torch.no_grad():
        ref = model(x)
        got = features(x).mean((2, 3)) @ weight.T + bias
    return float((got - ref).abs().max()) / max(1e-6, float(ref.abs().max()))


def _vit(**kw) -> nn.Module:
    base = {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 3}
    return timm.models.vision_transformer.VisionTransformer(**{**base, **kw}).eval()


def test_efficientnet_silu_shift_is_read_off_the_producer() -> None:
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=3).eval()
    features, _, bias = split_classifier(model)
    assert features.shift == SILU_SHIFT and features.nonnegative
    assert torch.allclose(bias, model.classifier.bias - SILU_SHIFT * model.classifier.weight.sum(1))
    # the same trunk ending in a signed activation is reported honestly: no shift, signed
    model.bn2.act = nn.GELU()
    features, _, _ = split_classifier(model)
    assert features.shift == 0.0 and features.nonnegative is False
    # and ending in ReLU: non-negative, no shift
    model.bn2.act = nn.ReLU()
    features, _, _ = split_classifier(model)
    assert features.shift == 0.0 and features.nonnegative is True
    with torch.no_grad():
        assert float(features(torch.randn(1, 3, 32, 32)).min()) >= 0.0


def test_split_does_not_touch_a_training_mode_model() -> None:
    model = timm.create_model("resnet18", num_classes=3)  # training mode: the probe must not update BN stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features, _, _ = split_classifier(model)
    assert model.training and all(m.training for m in model.modules()) and features.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vit_avg_pool_with_and_without_fc_norm_and_register_tokens() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for kw in ({"global_pool": "avg"}, {"global_pool": "avg", "fc_norm": False},
               {"global_pool": "avg", "reg_tokens": 2}, {"global_pool": "avg", "class_token": False}):
        model = _vit(**kw)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0.0, 0.3)
        assert _logits_close(model, x) < 1e-5, kw
        assert split_classifier(model)[0](x).shape == (2, 16, 2, 2)


@pytest.mark.parametrize(
    "build, match, fix",
    [
        (lambda: _vit(), r"class token \(global_pool='token'", "global_pool='avg'"),
        (lambda: _vit(global_pool="map"), "attention pooling", "global_pool='avg'"),
        (lambda: _vit(global_pool="max"), "'max', not 'avg'", "global_pool='avg'"),
        (lambda: _vit(global_pool="avg", pool_include_prefix=True), "prefix", "pool_include_prefix=False"),
        (lambda: timm.create_model("convnext_atto", num_classes=3, head_hidden_size=8), "MLP", "global_pool='avg'"),
        (lambda: timm.create_model("mobilenetv3_small_050", num_classes=3), "conv_head", "global_pool='avg'"),
        (lambda: timm.create_model("resnet18", num_classes=0), r"num_classes=0", "num_classes=C"),
        (lambda: timm.create_model("resnet18", num_classes=3, global_pool="max"), "pool_type='max'", "avg"),
    ],
    ids=["vit-token", "vit-map", "vit-max", "vit-prefix", "convnext-mlp-head", "mobilenetv3", "no-classifier",
         "resnet-maxpool"],
)
def test_unsupported_heads_are_refused_with_reason_and_fix(build, match: str, fix: str) -> None:
    model = build().eval()
    with pytest.raises(UnsupportedModelError, match=match) as info:
        split_classifier(model)
    msg = str(info.value)
    assert "Fix:" in msg and fix in msg and "Got:" in msg


def test_subclass_overriding_forward_is_refused() -> None:
    class Doubled(timm.models.resnet.ResNet):
        def forward(self, x):  # pragma: no cover - never called
            return 2 * super().forward(x)

    model = Doubled(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1], num_classes=3).eval()
    with pytest.raises(UnsupportedModelError, match="overrides forward"):
        split_classifier(model)


def test_a_head_that_is_not_what_it_looks_like_fails_the_probe_check() -> None:
    model = timm.create_model("resnet18", num_classes=3).eval()
    model.global_pool.pool = nn.AdaptiveMaxPool2d(1)  # still says pool_type='avg'; really a max pool
    model.global_pool.flatten = nn.Flatten(1)
    with pytest.raises(UnsupportedModelError, match="does not reproduce forward_head"):
        split_classifier(model)


def test_timm_is_imported_lazily() -> None:
    code = (
        "import sys, torchvision.models as tvm\n"
        "from phpn_core.models.split import split_classifier, supported_architectures, supported_timm_families\n"
        "from phpn_core.models.spec import ModelSpec\n"
        "split_classifier(tvm.resnet18(num_classes=2).eval()); supported_architectures(); supported_timm_families()\n"
        "ModelSpec(arch='resnet18', num_classes=2)\n"
        "assert 'timm' not in sys.modules, 'timm imported'\n"
        "ModelSpec(arch='timm:resnet18', num_classes=2)\n"
        "assert 'timm' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_families_listed() -> None:
    assert {"resnet", "regnet", "efficientnet", "convnext", "swin", "vit_avg"} <= set(supported_timm_families())


# ----------------------------------------------------------------------------------------------------------------
# timm:<name> specs


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_timm_spec_loads_state_dict_safetensors_and_training_checkpoint(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).eval()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "sd.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")  # as on the HF hub
    torch.save(sd, tmp_path / "pytorch_model.bin")
    # timm's train.py: {"epoch", "arch", "state_dict", "args": argparse.Namespace, ...}
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": sd, "args": argparse.Namespace(lr=0.1, model="r")},
               tmp_path / "checkpoint-3.pth.tar.pth")
    x = torch.randn(1, 3, 32, 32)
    for name in ("sd.pth", "model.safetensors", "pytorch_model.bin", "checkpoint-3.pth.tar.pth"):
        built = build_model(ModelSpec(arch="timm:resnet18", checkpoint=str(tmp_path / name), num_classes=4))
        assert isinstance(built, timm.models.resnet.ResNet) and not built.training and _same(built, model), name
        with torch.no_grad():
            assert torch.equal(built(x), model(x))
    spec = ModelSpec(arch="timm:resnet18", checkpoint=str(tmp_path / "sd.pth"), num_classes=4)
    other = ModelSpec(arch="timm:resnet18", checkpoint=str(tmp_path / "pytorch_model.bin"), num_classes=4)
    assert model_fingerprint(spec) != model_fingerprint(spec.model_copy(update={"arch": "resnet18"}))
    assert len(model_fingerprint(other)) == 16


def test_timm_vit_spec_follows_input_size_and_avg_pool_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, global_pool="avg", img_size=32).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    built = build_model(ModelSpec(arch="timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.pt"),
                                  num_classes=3, input_size=32))
    assert built.global_pool == "avg" and _same(built, model)
    features, _, _ = split_classifier(built)
    assert features(torch.randn(1, 3, 32, 32)).shape == (1, 192, 2, 2)


def test_timm_spec_errors(tmp_path) -> None:
    with pytest.raises(ValidationError, match="timm has no model named 'resnet19x'"):
        ModelSpec(arch="timm:resnet19x", num_classes=3)
    with pytest.raises(ValidationError, match="names no model"):
        ModelSpec(arch="timm:", num_classes=3)
    with pytest.raises(ValidationError, match="torchvision architectures.*checkpoint"):
        ModelSpec(arch="timm:resnet18", num_classes=3, weights="IMAGENET1K_V1")
    torch.save(timm.create_model("resnet18", num_classes=5).state_dict(), tmp_path / "r5.pt")
    from phpn_core.models.spec import CheckpointError

    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \[5, 512\] vs model \[3, 512\]"):
        build_model(ModelSpec(arch="timm:resnet18", checkpoint=str(tmp_path / "r5.pt"), num_classes=3))
