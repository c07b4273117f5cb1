"""torchvision CNN adapters: one splitter per family (ResNet, DenseNet, MobileNet V2/V3, EfficientNet, ConvNeXt),
plus :func:`vgg_gap`, a VGG with a GAP + linear head. Each returns (features, weight [C, D], bias [C]).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from phpn_core.errors import InputValueError, UnsupportedModelError
from phpn_core.models.arch_names import (
    CONVNEXT_NAMES,
    DENSENET_NAMES,
    EFFICIENTNET_NAMES,
    MOBILENET_V3_NAMES,
    RESNET_NAMES,
    VGG_CFG,
    torchvision_cnn_architectures,
)
from phpn_core.models.extractor import (
    NONNEG_ACTIVATIONS,
    PASSTHROUGH,
    FeatureExtractor,
    LayerNormedExtractor,
    PenultimateExtractor,
    Split,
    check_forward,
    ends_nonnegative,
    require_gap,
    require_linear,
    shifted,
    unsupported,
    weight_bias,
)

#: Added to EfficientNet features: SiLU's minimum is -0.278464542761074, so SiLU(x) + 0.2785 > 0.
SILU_SHIFT: float = 0.2785
#: Added to MobileNet V3 penultimate activations: Hardswish's minimum is exactly -0.375 (at x = -1.5).
HARDSWISH_SHIFT: float = 0.375




def architectures() -> list[str]:
    """The torchvision architecture names these adapters recognise (``FeatureExtractor.arch``)."""
    return torchvision_cnn_architectures()


# ----------------------------------------------------------------------------------------------------------------
# VGG with a GAP + linear head


class VGGGAP(nn.Module):
    """A VGG conv trunk (without its last max-pool) + global average pooling + one Linear.

    forward: x [B, 3, H, W] -> ``classifier(features(x).mean((2, 3)))`` [B, num_classes]; features(x) is
    [B, 512, H/16, W/16] and ends with ReLU.
    """

    def __init__(self, features: nn.Module, *, num_classes: int, arch: str = "vgg", in_features: int = 512) -> None:
        super().__init__()
        self.arch = arch
        self.features = features
        self.classifier = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)  # as torchvision initialises VGG's linears
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def vgg_gap(arch: str = "vgg16", *, num_classes: int, weights: Any = None) -> VGGGAP:
    """Build a :class:`VGGGAP`: torchvision's ``arch`` trunk without the final max-pool, GAP, Linear(512, C).

    Args:
        arch: one of vgg11, vgg13, vgg16, vgg19 and their ``_bn`` variants.
        num_classes: C, the number of outputs of the new linear head.
        weights: torchvision weights for the trunk (enum or name, e.g. ``"IMAGENET1K_V1"``), or None for a random
            init. Only the conv trunk is taken from them; the linear head is new and needs training.
    Returns:
        VGGGAP in training mode (as torchvision builds models); call ``.eval()`` before splitting.
    """
    if arch not in VGG_CFG:
        raise UnsupportedModelError(
            f"vgg_gap: unknown VGG architecture. Expected one of {sorted(VGG_CFG)}; got {arch!r}. "
            f"Fix: pass one of those names, e.g. vgg_gap('vgg16', num_classes=...)."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputValueError(
            f"vgg_gap: num_classes must be a positive int; got {num_classes!r}. Fix: pass e.g. num_classes=200."
        )
    if weights is None:
        # build the trunk alone: torchvision's full VGG would also allocate and initialise a ~120M-parameter MLP
        cfg, batch_norm = VGG_CFG[arch]
        trunk = tvm.vgg.make_layers(tvm.vgg.cfgs[cfg], batch_norm=batch_norm)
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):  # torchvision VGG's init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    else:
        trunk = getattr(tvm, arch)(weights=weights).features
    if not isinstance(trunk[-1], nn.MaxPool2d):  # pragma: no cover - torchvision's layout
        raise UnsupportedModelError(
            f"vgg_gap: torchvision's {arch} trunk layout changed. Expected it to end with MaxPool2d; got "
            f"{type(trunk[-1]).__name__}. Fix: pin torchvision==0.29.1."
        )
    return VGGGAP(trunk[:-1], num_classes=num_classes, arch=arch)



def _split_resnet(model: tvm.ResNet) -> Split:
    check_forward(model, tvm.ResNet, ("forward", "_forward_impl"))
    require_gap(model, model.avgpool, "model.avgpool")
    linear = require_linear(model, model.fc, "model.fc")
    key = (
        type(model.layer1[0]).__name__,
        tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)),
        int(getattr(model, "groups", 1)),
        int(getattr(model, "base_width", 64)),
    )
    body = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )
    features = FeatureExtractor(
        body, arch=RESNET_NAMES.get(key, "resnet"), out_channels=linear.in_features, nonnegative=True
    )
    return (features, *weight_bias(linear))


def _split_densenet(model: tvm.DenseNet) -> Split:
    check_forward(model, tvm.DenseNet, ("forward",))
    linear = require_linear(model, model.classifier, "model.classifier")
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    try:
        growth = int(blocks[0].denselayer1.conv2.out_channels)
    except (IndexError, AttributeError):
        growth = -1
    arch = DENSENET_NAMES.get((growth, tuple(len(b) for b in blocks)), "densenet")
    # torchvision's DenseNet.forward applies F.relu after .features (its last module is a BatchNorm)
    features = FeatureExtractor(
        model.features, arch=arch, out_channels=linear.in_features, nonnegative=True, final_relu=True
    )
    return (features, *weight_bias(linear))


def _split_mobilenet_v2(model: tvm.MobileNetV2) -> Split:
    check_forward(model, tvm.MobileNetV2, ("forward", "_forward_impl"))
    linear = require_linear(model, model.classifier, "model.classifier")
    features = FeatureExtractor(
        model.features, arch="mobilenet_v2", out_channels=linear.in_features,
        nonnegative=ends_nonnegative(model.features),
    )
    return (features, *weight_bias(linear))



def _split_efficientnet(model: tvm.EfficientNet) -> Split:
    check_forward(model, tvm.EfficientNet, ("forward", "_forward_impl"))
    require_gap(model, model.avgpool, "model.avgpool")
    linear = require_linear(model, model.classifier, "model.classifier")
    try:
        key = (
            int(model.features[0][0].out_channels),
            sum(len(stage) for stage in model.features[1:-1]),
            int(model.features[-1][0].out_channels),
        )
    except (TypeError, IndexError, AttributeError):
        key = (-1, -1, -1)
    last = model.features
    while isinstance(last, nn.Sequential) and len(last) > 0:
        last = last[-1]
    if isinstance(last, nn.SiLU):
        shift, nonneg = SILU_SHIFT, True
    else:  # a modified trunk: report honestly instead of shifting blindly
        shift, nonneg = 0.0, ends_nonnegative(model.features)
    features = FeatureExtractor(
        model.features, arch=EFFICIENTNET_NAMES.get(key, "efficientnet"), out_channels=linear.in_features,
        nonnegative=nonneg, shift=shift,
    )
    return shifted(features, linear, shift)


def _split_mobilenet_v3(model: tvm.MobileNetV3) -> Split:
    check_forward(model, tvm.MobileNetV3, ("forward", "_forward_impl"))
    require_gap(model, model.avgpool, "model.avgpool")
    head = model.classifier
    if not (isinstance(head, nn.Sequential) and len(head) >= 2 and isinstance(head[-1], nn.Linear)):
        raise unsupported(model, "MobileNetV3 .classifier does not end with an nn.Linear")
    linear = head[-1]
    pre_head = head[:-1]  # shares the modules
    acts = [m for m in pre_head if not isinstance(m, PASSTHROUGH)]
    last_act = acts[-1] if acts else None
    if isinstance(last_act, nn.Hardswish):
        shift, nonneg = HARDSWISH_SHIFT, True
    else:
        shift, nonneg = 0.0, isinstance(last_act, NONNEG_ACTIVATIONS)
    try:
        arch = MOBILENET_V3_NAMES.get(int(model.features[-1][0].out_channels), "mobilenet_v3")
    except (TypeError, IndexError, AttributeError):
        arch = "mobilenet_v3"
    warnings.warn(
        f"split_classifier: {arch} is not GAP + linear (its head is Linear -> Hardswish -> Dropout -> Linear after "
        f"pooling); it was split at the last Linear, so the feature map is [B, {linear.in_features}, 1, 1] with no "
        f"spatial extent: logits are exact but heatmaps are uninformative. Use a GAP + linear backbone (e.g. "
        f"mobilenet_v2, efficientnet_b0) when you need 'where'.",
        UserWarning,
        stacklevel=4,  # the caller of split_classifier
    )
    features = PenultimateExtractor(
        model.features, pre_head, arch=arch, out_channels=linear.in_features, nonnegative=nonneg, shift=shift
    )
    return shifted(features, linear, shift)


def _split_convnext(model: tvm.ConvNeXt) -> Split:
    check_forward(model, tvm.ConvNeXt, ("forward", "_forward_impl"))
    require_gap(model, model.avgpool, "model.avgpool")
    head = model.classifier
    ok = (
        isinstance(head, nn.Sequential)
        and len(head) == 3
        and isinstance(head[0], nn.LayerNorm)
        and isinstance(head[1], nn.Flatten)
        and isinstance(head[2], nn.Linear)
    )
    if not ok or len(head[0].normalized_shape) != 1:
        raise unsupported(model, "ConvNeXt .classifier is not LayerNorm2d(D), Flatten, Linear")
    norm, linear = head[0], head[2]
    try:
        key = (int(model.features[0][0].out_channels), tuple(len(model.features[i]) for i in (1, 3, 5, 7)))
    except (TypeError, IndexError, AttributeError):
        key = (-1, ())
    with torch.no_grad():
        w = linear.weight.detach()
        gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(w[0])
        beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(w[0])
        weight = (w * gamma[None, :]).clone()
        bias = (linear.bias.detach() if linear.bias is not None else torch.zeros_like(w[:, 0])) + w @ beta
    features = LayerNormedExtractor(
        model.features, eps=norm.eps, arch=CONVNEXT_NAMES.get(key, "convnext"),
        out_channels=linear.in_features, nonnegative=False,
    )
    return features, weight, bias.clone()


def _split_vgg_gap(model: VGGGAP) -> Split:
    check_forward(model, VGGGAP, ("forward",))
    linear = require_linear(model, model.classifier, "model.classifier")
    features = FeatureExtractor(
        model.features, arch=f"{model.arch}_gap", out_channels=linear.in_features,
        nonnegative=ends_nonnegative(model.features),
    )
    return (features, *weight_bias(linear))


# torchvision classes known NOT to be GAP + linear, with why (for the error message)
KNOWN_UNSUPPORTED: dict[type, str] = {
    tvm.VGG: "torchvision VGG's classifier is a 3-layer MLP on a 7x7 pooled map (use vgg_gap to build a GAP + "
    "linear VGG)",
    tvm.AlexNet: "AlexNet's classifier is an MLP",
    tvm.SqueezeNet: "SqueezeNet's classifier is a conv followed by pooling, not a Linear",
    tvm.Inception3: "Inception v3 has auxiliary heads and input transforms in forward",
    tvm.GoogLeNet: "GoogLeNet has auxiliary heads and input transforms in forward",
}  # ViT (refused) and Swin (split): see torchvision_transformers



# isinstance order matters only for subclasses; none of these classes derives from another
SPLITTERS: tuple[tuple[type, Any], ...] = (
    (tvm.ResNet, _split_resnet),
    (tvm.DenseNet, _split_densenet),
    (tvm.MobileNetV2, _split_mobilenet_v2),
    (tvm.MobileNetV3, _split_mobilenet_v3),
    (tvm.EfficientNet, _split_efficientnet),
    (tvm.ConvNeXt, _split_convnext),
    (VGGGAP, _split_vgg_gap),
)
