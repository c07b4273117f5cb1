"""split_classifier: features(x).mean((2, 3)) @ W.T + b reproduces model(x) for every supported backbone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from phpn_core.models.split import (
    HARDSWISH_SHIFT,
    SILU_SHIFT,
    VGGGAP,
    FeatureExtractor,
    split_classifier,
    supported_architectures,
    verify_split,
    vgg_gap,
)
from phpn_core.errors import ShapeError, UnsupportedModelError

torch.set_num_threads(2)

NUM_CLASSES = 7

# name -> (builder, input side, expected shift, expected nonnegative). Inputs are the smallest that keep a spatial
# map > 1x1 where cheap (64 -> 2x2 at stride 32), and the smallest accepted for the heaviest models.
CASES = {
    "resnet18": (lambda: tvm.resnet18(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "resnet34": (lambda: tvm.resnet34(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "resnet50": (lambda: tvm.resnet50(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "resnet101": (lambda: tvm.resnet101(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "resnet152": (lambda: tvm.resnet152(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "densenet121": (lambda: tvm.densenet121(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "densenet161": (lambda: tvm.densenet161(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "densenet169": (lambda: tvm.densenet169(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "densenet201": (lambda: tvm.densenet201(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(weights=None, num_classes=NUM_CLASSES), 64, 0.0, True),
    "mobilenet_v3_small": (
        lambda: tvm.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES), 64, HARDSWISH_SHIFT, True
    ),
    "mobilenet_v3_large": (
        lambda: tvm.mobilenet_v3_large(weights=None, num_classes=NUM_CLASSES), 64, HARDSWISH_SHIFT, True
    ),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None, num_classes=NUM_CLASSES), 64, SILU_SHIFT, True),
    "efficientnet_v2_s": (
        lambda: tvm.efficientnet_v2_s(weights=None, num_classes=NUM_CLASSES), 64, SILU_SHIFT, True
    ),
    "convnext_tiny": (lambda: tvm.convnext_tiny(weights=None, num_classes=NUM_CLASSES), 64, 0.0, False),
    "vgg11_gap": (lambda: vgg_gap("vgg11", num_classes=NUM_CLASSES), 32, 0.0, True),
    "vgg16_gap": (lambda: vgg_gap("vgg16", num_classes=NUM_CLASSES), 32, 0.0, True),
}


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running stats to the statistics of batch x, then eval mode.

    With random init and default running stats (0, 1), MobileNet's and EfficientNet's activations vanish in eval
    mode (logits ~1e-10, MobileNet V3's penultimate layer exactly 0), which would make the logit comparison vacuous.
    (ResNet/DenseNet stay O(1)..O(1e4) and are left alone: the extra forward is what the time budget can't afford.)
    The test batch itself is used: with 1x1 deep maps, another 2-image batch's statistics blow activations up.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0  # running stats := this batch's stats
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _randomise_head(model: nn.Module) -> None:
    """Give every Linear/norm affine a non-trivial random value, so bias/gamma/beta folding is really exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))  # small: logits depend on x
    # ConvNeXt's head LayerNorm: gamma/beta away from 1/0
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential) and isinstance(head[0], nn.LayerNorm):
        with torch.no_grad():
            head[0].weight.copy_(1 + 0.5 * torch.randn(head[0].weight.shape, generator=gen))
            head[0].bias.copy_(0.5 * torch.randn(head[0].bias.shape, generator=gen))


def _versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(storage address, in-place version counter) of every parameter and buffer."""
    return {k: (v.data_ptr(), v._version) for k, v in model.state_dict(keep_vars=True).items()}


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> bool:
    """max |got - ref| <= rtol x the logit scale max |ref|."""
    scale = max(1e-6, float(ref.abs().max()))
    return float((got - ref).abs().max()) <= rtol * scale


@pytest.mark.parametrize("name", list(CASES))
def test_split_reproduces_logits(name: str) -> None:
    build, side, shift, nonneg = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, side, side)
    if name.startswith(("mobilenet", "efficientnet")):
        _calibrate_batchnorm(model, x)
    else:
        model.eval()
    _randomise_head(model)
    # in-place changes bump a tensor's version counter: a free, exact "untouched" check (no state_dict copy)
    versions = _versions(model)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features, weight, bias = split_classifier(model)
    spatial_warnings = [w for w in caught if "no spatial extent" in str(w.message)]
    assert bool(spatial_warnings) == name.startswith("mobilenet_v3")

    # metadata
    assert isinstance(features, FeatureExtractor)
    assert features.arch == name
    assert features.shift == shift
    assert features.nonnegative is nonneg
    assert weight.shape == (NUM_CLASSES, features.out_channels)
    assert bias.shape == (NUM_CLASSES,)
    assert not weight.requires_grad and not bias.requires_grad

    raw: list[torch.Tensor] = []  # the trunk's output during model(x), captured for free
    trunk = model.layer4 if isinstance(model, tvm.ResNet) else model.features
    hook = trunk.register_forward_hook(lambda _m, _i, out: raw.append(out.clone()))
    with torch.no_grad():
        ref = model(x)
        hook.remove()
        fmap = features(x)
        got = fmap.mean((2, 3)) @ weight.T + bias
    assert fmap.shape[:2] == (2, features.out_channels)
    if name.startswith("mobilenet_v3"):
        assert fmap.shape[2:] == (1, 1)
    else:
        assert fmap.shape[2] * fmap.shape[3] > 1  # a real spatial map was exercised
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert _close(got, ref), f"{name}: max diff {diff:.3g}, logit scale {scale:.3g}"
    if nonneg:
        assert float(fmap.min()) >= 0.0
    if name.startswith("efficientnet"):
        # the SiLU map really is negative, the shift is exactly what was added, and the bias compensates it
        assert -SILU_SHIFT <= float(raw[0].min()) < 0.0
        assert torch.allclose(fmap, raw[0] + SILU_SHIFT)
        linear = model.classifier[-1]
        assert torch.allclose(bias, linear.bias - SILU_SHIFT * linear.weight.sum(1))

    # the model is untouched: mode, parameters, buffers
    assert not model.training and not features.training
    assert _versions(model) == versions

    # weight/bias are copies: mutating them does not change the model
    weight.add_(1.0)
    bias.add_(1.0)
    assert _versions(model) == versions


def test_split_keeps_training_mode() -> None:
    model = tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES)  # training mode
    features, _, _ = split_classifier(model)
    assert model.training and features.training
    assert all(m.training for m in model.modules())


class _SynthLike(nn.Module):
    """Like phpn's SynthPartsCNN: .features ending with ReLU, .classifier Linear on the spatial mean."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, bias: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU()
        )
        self.classifier = nn.Linear(16, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_generic_features_classifier_model() -> None:
    torch.manual_seed(0)
    model = _SynthLike().eval()
    features, weight, bias = split_classifier(model)
    assert features.arch == "_SynthLike"
    assert features.nonnegative and features.shift == 0.0 and features.out_channels == 16
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        assert _close(features(x).mean((2, 3)) @ weight.T + bias, ref)
    assert verify_split(model, x) < 1e-4
    # the returned weight/bias are copies, the feature extractor shares the trunk
    weight.zero_()
    bias.add_(5.0)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert features.body is model.features


def test_class_attribute_overrides_nonnegativity() -> None:
    class Signed(_SynthLike):
        features_nonnegative = False

    assert split_classifier(Signed().eval())[0].nonnegative is False


def test_linear_without_bias_gives_zero_bias() -> None:
    model = _SynthLike(bias=False).eval()
    _, weight, bias = split_classifier(model)
    assert torch.equal(bias, torch.zeros(NUM_CLASSES))
    assert weight.shape == (NUM_CLASSES, 16)


def test_sequential_gap_linear_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 5)
    ).eval()
    features, weight, bias = split_classifier(model)
    assert features.arch == "sequential" and features.nonnegative
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert _close(features(x).mean((2, 3)) @ weight.T + bias, model(x))


def test_custom_features_and_head() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh()).eval()
    fc = nn.Linear(6, 4)
    features, weight, bias = split_classifier(None, features=trunk, head=fc)
    assert features.arch == "custom" and features.nonnegative is False and features.out_channels == 6
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert _close(features(x).mean((2, 3)) @ weight.T + bias, fc(trunk(x).mean((2, 3))))
    # a Dropout + Linear head is accepted too
    split_classifier(None, features=trunk, head=nn.Sequential(nn.Dropout(), fc))


def test_custom_head_not_linear_raises() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())
    mlp = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(UnsupportedModelError, match=r"head is not a linear layer.*got Sequential\(Linear, ReLU, Linear\)"):
        split_classifier(None, features=trunk, head=mlp)
    with pytest.raises(TypeError, match="features and head must be given together"):
        split_classifier(None, features=trunk)


def test_feature_extractor_shape_errors() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())
    features, _, _ = split_classifier(None, features=trunk, head=nn.Linear(5, 2))  # D mismatch: 6 vs 5
    with pytest.raises(ShapeError, match=r"\[B, 5, h, w\].*got \(1, 6, 6, 6\)"):
        features(torch.randn(1, 3, 8, 8))
    with pytest.raises(ShapeError, match="4-D image batch"):
        features(torch.randn(3, 8, 8))


class _MLPHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _meta_googlenet() -> nn.Module:
    with torch.device("meta"):  # structure only
        return tvm.googlenet(weights=None, aux_logits=False, init_weights=False)


def _tiny_vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)


@pytest.mark.parametrize(
    "build, reason",
    [
        (_meta_googlenet, "GoogLeNet"),
        (_tiny_vit, "ViT"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), "no recognisable"),
        (_MLPHead, r"model\.classifier is not a single nn\.Linear.*Sequential\(Linear, ReLU, Linear\)"),
        (lambda: nn.Conv2d(3, 4, 3), "no recognisable"),
    ],
    ids=["googlenet", "vit", "sequential-no-linear", "mlp-classifier", "bare-conv"],
)
def test_unsupported_models_list_architectures(build, reason: str) -> None:
    model = build().eval()
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        split_classifier(model)
    msg = str(info.value)
    for arch in ("resnet34", "densenet121", "efficientnet_b0", "convnext_tiny", "vgg16_gap", "mobilenet_v2"):
        assert arch in msg
    assert "Fix:" in msg and "Got:" in msg


def test_resnet_subclass_overriding_forward_is_refused() -> None:
    class Odd(tvm.ResNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
            return super().forward(x) * 2

    model = Odd(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3).eval()
    with pytest.raises(UnsupportedModelError, match="overrides forward"):
        split_classifier(model)


def test_verify_split_detects_non_gap_forward() -> None:
    class NotGap(_SynthLike):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x).amax((2, 3)))  # max-pool head

    torch.manual_seed(0)
    model = NotGap().eval()
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        verify_split(model, torch.randn(2, 3, 16, 16))


def test_supported_architectures_and_vgg_gap() -> None:
    names = supported_architectures()
    for expected in (
        ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
        + ["densenet121", "densenet161", "densenet169", "densenet201"]
        + ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b7"]
        + ["efficientnet_v2_s", "convnext_tiny", "vgg11_gap", "vgg16_gap", "vgg19_bn_gap"]
    ):
        assert expected in names
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = vgg_gap("vgg13_bn", num_classes=3)
    assert isinstance(model, VGGGAP) and isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == 512 and not isinstance(model.features[-1], nn.MaxPool2d)
    with pytest.raises(UnsupportedModelError, match="vgg16"):
        vgg_gap("vgg17", num_classes=3)
    with pytest.raises(UnsupportedModelError, match="use vgg_gap"):
        with torch.device("meta"):  # torchvision's VGG allocates a 120M-parameter MLP
            vgg = tvm.VGG(nn.Sequential(nn.Conv2d(3, 512, 3)), num_classes=2, init_weights=False).eval()
        split_classifier(vgg)
