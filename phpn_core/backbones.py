"""Split a trained classifier into a feature extractor and a linear head.

The method (see DESIGN.md) needs a classifier of the form

    logits(x) = mean_hw( F(x)_hw ) @ W.T + b          F(x) [B, D, h, w], W [C, D], b [C]

``split_classifier(model)`` returns ``(features, weight, bias)`` with ``features`` a :class:`FeatureExtractor`
(x [B, 3, H, W] -> F(x) [B, D, h, w]), ``weight`` [C, D] and ``bias`` [C], such that, in eval mode,

    features(x).mean((2, 3)) @ weight.T + bias == model(x)        (to float tolerance)

``weight`` and ``bias`` are detached copies; ``features`` *shares* the model's modules (no copy), so it follows
the model's weights and its train/eval mode.

Supported architectures
-----------------------

================================================  ================================  ======  ===========
architecture (``FeatureExtractor.arch``)          F(x)                              shift   nonnegative
================================================  ================================  ======  ===========
resnet18/34/50/101/152, resnext*, wide_resnet*    ``layer4`` output (post-ReLU)     0       yes
densenet121/161/169/201                           ``relu(features(x))``             0       yes
mobilenet_v2                                      ``features`` (post-ReLU6)         0       yes
efficientnet_b0..b7, efficientnet_v2_s/m/l        ``features`` (post-SiLU) + s      0.2785  yes
mobilenet_v3_small/large                          penultimate vector, 1x1 map + s   0.375   yes
convnext_tiny/small/base/large                    per-image LayerNormed map         0       **no**
vgg11/13/16/19[_bn]_gap (:func:`vgg_gap`)         conv trunk without its last pool  0       yes
<class name>: ``.features`` + Linear             ``features(x)``                   0       inferred
``.classifier``/``.fc`` (generic)
"sequential": ``Sequential(..., GAP, Flatten,     the prefix before the pool        0       inferred
Linear)``
"custom": explicit ``features=``, ``head=``       ``features(x)``                   0       inferred
================================================  ================================  ======  ===========

Shifts. NMF needs F(x) >= 0. Where the last activation is signed but bounded below, a fixed constant ``s`` is
added inside ``FeatureExtractor.forward`` and the bias is compensated, ``bias = b - s * W.sum(1)``, so the identity
above still holds exactly (``mean(F + s) @ W.T = mean(F) @ W.T + s * W.sum(1)``):

- SiLU's minimum is ``-0.278464542761074`` (at x ~ -1.2785); EfficientNet uses ``s = SILU_SHIFT = 0.2785``.
- Hardswish's minimum is exactly ``-0.375`` (at x = -1.5); MobileNet V3 uses ``s = HARDSWISH_SHIFT = 0.375``.

After a shift the map is clamped at 0: in fp32 this never changes a value (the bounds hold), it only absorbs
bf16/fp16 rounding of the activation below its true minimum.

MobileNet V3 is not GAP + linear: its head is ``Linear -> Hardswish -> Dropout -> Linear`` after pooling. It is
split at the last Linear, so ``features`` returns the penultimate activations as a [B, D, 1, 1] map; the logits are
exact but the map has no spatial extent, so heatmaps are uninformative (a ``UserWarning`` says so).

ConvNeXt's head is ``LayerNorm2d -> Flatten -> Linear`` after pooling. LayerNorm of the pooled vector ``g = GAP(F)``
is a per-image affine map, so an exact split exists: ``features(x)_hw = (F_hw - mu(g)) / sigma(g)`` with
``mu``/``sigma`` the LayerNorm statistics of g over channels (``sigma = sqrt(var + eps)``), ``weight = W * gamma``,
``bias = b + W @ beta``. These features are signed and unbounded (``nonnegative = False``): NMF-based discovery
needs its own handling for them.

Generic models. A module with ``.features`` (the conv trunk) and ``.classifier`` or ``.fc`` that is an ``nn.Linear``
(optionally behind Dropout/Flatten/Identity in an ``nn.Sequential``) is taken to compute
``classifier(features(x).mean((2, 3)))`` -- e.g. phpn's own SynthPartsCNN. This cannot be checked statically;
:func:`verify_split` checks it on a batch. ``nonnegative`` is inferred: the class attribute
``features_nonnegative: bool`` wins if present; otherwise it is True when the trunk (an ``nn.Sequential``,
recursively) ends with ReLU/ReLU6/Sigmoid/Hardsigmoid/Softplus.

Mode and parameters. The caller puts the model in eval mode (BatchNorm statistics, Dropout); the identity holds in
eval mode. ``split_classifier`` never changes the model's mode or parameters.

Unsupported (raise :class:`~phpn_core.errors.UnsupportedModelError`): heads that are not GAP + linear, e.g. torchvision
VGG/AlexNet (MLP classifiers; use :func:`vgg_gap`), Inception/GoogLeNet, ViT/Swin, SqueezeNet, or a model whose
``classifier`` is an MLP. Pass ``features=`` and ``head=`` explicitly for anything else that is GAP + linear.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from phpn_core.errors import InputValueError, ShapeError, UnsupportedModelError

__all__ = [
    "FeatureExtractor",
    "HARDSWISH_SHIFT",
    "SILU_SHIFT",
    "VGGGAP",
    "split_classifier",
    "supported_architectures",
    "verify_split",
    "vgg_gap",
]

#: Added to EfficientNet features: SiLU's minimum is -0.278464542761074, so SiLU(x) + 0.2785 > 0.
SILU_SHIFT: float = 0.2785
#: Added to MobileNet V3 penultimate activations: Hardswish's minimum is exactly -0.375 (at x = -1.5).
HARDSWISH_SHIFT: float = 0.375

_RESNET_NAMES: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("BasicBlock", (2, 2, 2, 2), 1, 64): "resnet18",
    ("BasicBlock", (3, 4, 6, 3), 1, 64): "resnet34",
    ("Bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("Bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("Bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("Bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("Bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("Bottleneck", (3, 4, 23, 3), 64, 4): "resnext101_64x4d",
    ("Bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("Bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
}
# (growth rate, layers per dense block)
_DENSENET_NAMES: dict[tuple[int, tuple[int, ...]], str] = {
    (32, (6, 12, 24, 16)): "densenet121",
    (48, (6, 12, 36, 24)): "densenet161",
    (32, (6, 12, 32, 32)): "densenet169",
    (32, (6, 12, 48, 32)): "densenet201",
}
# (stem channels, number of MBConv/FusedMBConv blocks, last conv channels); measured on torchvision 0.29.
_EFFICIENTNET_NAMES: dict[tuple[int, int, int], str] = {
    (32, 16, 1280): "efficientnet_b0",
    (32, 23, 1280): "efficientnet_b1",
    (32, 23, 1408): "efficientnet_b2",
    (40, 26, 1536): "efficientnet_b3",
    (48, 32, 1792): "efficientnet_b4",
    (48, 39, 2048): "efficientnet_b5",
    (56, 45, 2304): "efficientnet_b6",
    (64, 55, 2560): "efficientnet_b7",
    (24, 40, 1280): "efficientnet_v2_s",
    (24, 57, 1280): "efficientnet_v2_m",
    (32, 79, 1280): "efficientnet_v2_l",
}
# last conv channels at width 1.0
_MOBILENET_V3_NAMES: dict[int, str] = {576: "mobilenet_v3_small", 960: "mobilenet_v3_large"}
# (stem channels, blocks per stage)
_CONVNEXT_NAMES: dict[tuple[int, tuple[int, ...]], str] = {
    (96, (3, 3, 9, 3)): "convnext_tiny",
    (96, (3, 3, 27, 3)): "convnext_small",
    (128, (3, 3, 27, 3)): "convnext_base",
    (192, (3, 3, 27, 3)): "convnext_large",
}
_VGG_CFG: dict[str, tuple[str, bool]] = {
    f"vgg{depth}{suffix}": (cfg, suffix == "_bn")
    for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E"))
    for suffix in ("", "_bn")
}

_NONNEG_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_PASSTHROUGH = (nn.Dropout, nn.Identity, nn.Flatten)


def supported_architectures() -> list[str]:
    """Names of the architectures :func:`split_classifier` recognises, as reported in ``FeatureExtractor.arch``.

    Besides these, generic modules with ``.features`` + a Linear ``.classifier``/``.fc``, ``nn.Sequential`` models
    ending in GAP + Flatten + Linear, and explicit ``features=``/``head=`` are accepted (see the module docstring).
    """
    names = list(_RESNET_NAMES.values()) + list(_DENSENET_NAMES.values()) + ["mobilenet_v2"]
    names += list(_MOBILENET_V3_NAMES.values()) + list(_EFFICIENTNET_NAMES.values())
    names += list(_CONVNEXT_NAMES.values()) + [f"{name}_gap" for name in _VGG_CFG]
    return names


# ----------------------------------------------------------------------------------------------------------------
# feature extractors


class FeatureExtractor(nn.Module):
    """x [B, 3, H, W] -> feature map [B, D, h, w] whose spatial mean feeds the linear head.

    Attributes:
        body: the model's trunk (shared with the model, not copied).
        shift: the constant already added inside ``forward`` (0.0 if none); the returned bias compensates it.
        nonnegative: whether outputs are guaranteed >= 0 (what NMF needs).
        arch: architecture name, e.g. ``"resnet34"``, ``"convnext_tiny"``, ``"custom"``.
        out_channels: D.
        final_relu: apply ReLU after ``body`` (torchvision DenseNet does this in its ``forward``).
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        arch: str,
        out_channels: int,
        nonnegative: bool,
        shift: float = 0.0,
        final_relu: bool = False,
    ) -> None:
        super().__init__()
        self.body = body
        self.arch = str(arch)
        self.out_channels = int(out_channels)
        self.nonnegative = bool(nonnegative)
        self.shift = float(shift)
        self.final_relu = bool(final_relu)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        """The unshifted map [B, D, h, w]."""
        fmap = self.body(x)
        return F.relu(fmap) if self.final_relu else fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, D, h, w] (shifted by ``self.shift``)."""
        if x.dim() != 4:
            raise ShapeError(
                f"{self.arch} feature extractor: the input has the wrong number of dimensions. Expected a 4-D "
                f"image batch [B, 3, H, W]; got shape {tuple(x.shape)}. Fix: add the batch dimension "
                f"(x.unsqueeze(0)) or reshape to [B, 3, H, W]."
            )
        fmap = self._map(x)
        if fmap.dim() != 4 or fmap.shape[1] != self.out_channels:
            raise ShapeError(
                f"{self.arch} feature extractor: the trunk returned the wrong shape. Expected a feature map "
                f"[B, {self.out_channels}, h, w] (D = the head's in_features); got {tuple(fmap.shape)}. Fix: pass "
                f"the conv trunk whose output feeds the linear head (before pooling/flattening)."
            )
        if self.shift != 0.0:
            # the clamp only absorbs low-precision rounding below the activation's minimum; a no-op in fp32
            fmap = (fmap + self.shift).clamp_min(0.0)
        return fmap

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, out_channels={self.out_channels}, shift={self.shift}, "
            f"nonnegative={self.nonnegative}"
        )


class _PenultimateExtractor(FeatureExtractor):
    """MobileNet V3: trunk -> GAP -> head up to (not incl.) its last Linear, as a [B, D, 1, 1] map."""

    def __init__(self, body: nn.Module, pre_head: nn.Module, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.pre_head = pre_head

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.body(x).mean((2, 3))
        return self.pre_head(pooled)[:, :, None, None]


class _LayerNormedExtractor(FeatureExtractor):
    """ConvNeXt: trunk map normalised per image with the LayerNorm statistics of its spatial mean.

    ``out_hw = (F_hw - mu(g)) / sqrt(var(g) + eps)``, g = mean_hw F [B, D]; so mean_hw(out) = LayerNorm(g) without
    its affine part (which is folded into the returned weight/bias).
    """

    def __init__(self, body: nn.Module, *, eps: float, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.eps = float(eps)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.body(x)
        pooled = fmap.mean((2, 3), keepdim=True)  # [B, D, 1, 1]
        mu = pooled.mean(1, keepdim=True)
        var = pooled.var(1, unbiased=False, keepdim=True)  # LayerNorm uses the biased variance
        return (fmap - mu) * torch.rsqrt(var + self.eps)


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
    if arch not in _VGG_CFG:
        raise UnsupportedModelError(
            f"vgg_gap: unknown VGG architecture. Expected one of {sorted(_VGG_CFG)}; got {arch!r}. "
            f"Fix: pass one of those names, e.g. vgg_gap('vgg16', num_classes=...)."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputValueError(
            f"vgg_gap: num_classes must be a positive int; got {num_classes!r}. Fix: pass e.g. num_classes=200."
        )
    if weights is None:
        # build the trunk alone: torchvision's full VGG would also allocate and initialise a ~120M-parameter MLP
        cfg, batch_norm = _VGG_CFG[arch]
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


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _final_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear of a head that is a Linear, or a Sequential of Dropout/Identity/Flatten then one Linear."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential) and len(head) > 0 and isinstance(head[-1], nn.Linear):
        if all(isinstance(m, _PASSTHROUGH) for m in list(head)[:-1]):
            return head[-1]
    return None


def _is_gap(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def _ends_nonnegative(module: nn.Module) -> bool:
    """True when ``module`` is (or is a Sequential ending, recursively, in) a non-negative activation."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return isinstance(module, _NONNEG_ACTIVATIONS)


def _weight_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached copies of a Linear's weight [C, D] and bias [C] (zeros when it has none)."""
    weight = linear.weight.detach().clone()
    if linear.bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    else:
        bias = linear.bias.detach().clone()
    return weight, bias


def _seq_desc(module: object) -> str:
    """Class name, with the children's class names for a Sequential (e.g. an MLP head)."""
    desc = type(module).__name__
    if isinstance(module, nn.Sequential):
        desc += "(" + ", ".join(type(m).__name__ for m in module) + ")"
    return desc


def _describe(model: nn.Module) -> str:
    parts = [type(model).__name__]
    for name in ("features", "classifier", "fc", "head", "heads"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            parts.append(f".{name}={type(sub).__name__ if name == 'features' else _seq_desc(sub)}")
    return " ".join(parts)


def _unsupported(model: nn.Module, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"split_classifier: unsupported model: {reason}. Expected a global-average-pool + linear classifier, one "
        f"of: {', '.join(supported_architectures())}; or a module with .features (conv trunk) and a .classifier/.fc "
        f"that is an nn.Linear applied to the spatial mean of features(x); or an nn.Sequential ending in "
        f"AdaptiveAvgPool2d(1), Flatten, Linear. Got: {_describe(model)}. Fix: pass the trunk and the linear head "
        f"explicitly, split_classifier(model, features=<trunk>, head=<nn.Linear>), or for VGG build the model with "
        f"phpn_core.backbones.vgg_gap(...)."
    )


def _check_forward(model: nn.Module, cls: type, methods: tuple[str, ...]) -> None:
    """Refuse subclasses that override forward: the structural split would no longer match model(x)."""
    for name in methods:
        if getattr(type(model), name) is not getattr(cls, name):
            raise _unsupported(
                model,
                f"{type(model).__name__} subclasses torchvision's {cls.__name__} but overrides {name}(), so its "
                f"head may no longer be the standard one",
            )


def _require_linear(model: nn.Module, head: nn.Module, where: str) -> nn.Linear:
    linear = _final_linear(head)
    if linear is None:
        raise _unsupported(
            model,
            f"{where} is not a single nn.Linear (optionally behind Dropout/Flatten/Identity); it is {_seq_desc(head)}",
        )
    return linear


def _require_gap(model: nn.Module, pool: nn.Module, where: str) -> None:
    if not _is_gap(pool):
        raise _unsupported(model, f"{where} is {pool!r}, not AdaptiveAvgPool2d(1)")


# ----------------------------------------------------------------------------------------------------------------
# per-family splitters: each returns (features, weight, bias)

_Split = tuple[FeatureExtractor, torch.Tensor, torch.Tensor]


def _split_resnet(model: tvm.ResNet) -> _Split:
    _check_forward(model, tvm.ResNet, ("forward", "_forward_impl"))
    _require_gap(model, model.avgpool, "model.avgpool")
    linear = _require_linear(model, model.fc, "model.fc")
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
        body, arch=_RESNET_NAMES.get(key, "resnet"), out_channels=linear.in_features, nonnegative=True
    )
    return (features, *_weight_bias(linear))


def _split_densenet(model: tvm.DenseNet) -> _Split:
    _check_forward(model, tvm.DenseNet, ("forward",))
    linear = _require_linear(model, model.classifier, "model.classifier")
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    try:
        growth = int(blocks[0].denselayer1.conv2.out_channels)
    except (IndexError, AttributeError):
        growth = -1
    arch = _DENSENET_NAMES.get((growth, tuple(len(b) for b in blocks)), "densenet")
    # torchvision's DenseNet.forward applies F.relu after .features (its last module is a BatchNorm)
    features = FeatureExtractor(
        model.features, arch=arch, out_channels=linear.in_features, nonnegative=True, final_relu=True
    )
    return (features, *_weight_bias(linear))


def _split_mobilenet_v2(model: tvm.MobileNetV2) -> _Split:
    _check_forward(model, tvm.MobileNetV2, ("forward", "_forward_impl"))
    linear = _require_linear(model, model.classifier, "model.classifier")
    features = FeatureExtractor(
        model.features, arch="mobilenet_v2", out_channels=linear.in_features,
        nonnegative=_ends_nonnegative(model.features),
    )
    return (features, *_weight_bias(linear))


def _shifted(features: FeatureExtractor, linear: nn.Linear, shift: float) -> _Split:
    """Weight/bias for features that carry a constant shift s: bias = b - s * W.sum(1)."""
    weight, bias = _weight_bias(linear)
    if shift != 0.0:
        bias = bias - shift * weight.sum(1)
    return features, weight, bias


def _split_efficientnet(model: tvm.EfficientNet) -> _Split:
    _check_forward(model, tvm.EfficientNet, ("forward", "_forward_impl"))
    _require_gap(model, model.avgpool, "model.avgpool")
    linear = _require_linear(model, model.classifier, "model.classifier")
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
        shift, nonneg = 0.0, _ends_nonnegative(model.features)
    features = FeatureExtractor(
        model.features, arch=_EFFICIENTNET_NAMES.get(key, "efficientnet"), out_channels=linear.in_features,
        nonnegative=nonneg, shift=shift,
    )
    return _shifted(features, linear, shift)


def _split_mobilenet_v3(model: tvm.MobileNetV3) -> _Split:
    _check_forward(model, tvm.MobileNetV3, ("forward", "_forward_impl"))
    _require_gap(model, model.avgpool, "model.avgpool")
    head = model.classifier
    if not (isinstance(head, nn.Sequential) and len(head) >= 2 and isinstance(head[-1], nn.Linear)):
        raise _unsupported(model, "MobileNetV3 .classifier does not end with an nn.Linear")
    linear = head[-1]
    pre_head = head[:-1]  # shares the modules
    acts = [m for m in pre_head if not isinstance(m, _PASSTHROUGH)]
    last_act = acts[-1] if acts else None
    if isinstance(last_act, nn.Hardswish):
        shift, nonneg = HARDSWISH_SHIFT, True
    else:
        shift, nonneg = 0.0, isinstance(last_act, _NONNEG_ACTIVATIONS)
    try:
        arch = _MOBILENET_V3_NAMES.get(int(model.features[-1][0].out_channels), "mobilenet_v3")
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
    features = _PenultimateExtractor(
        model.features, pre_head, arch=arch, out_channels=linear.in_features, nonnegative=nonneg, shift=shift
    )
    return _shifted(features, linear, shift)


def _split_convnext(model: tvm.ConvNeXt) -> _Split:
    _check_forward(model, tvm.ConvNeXt, ("forward", "_forward_impl"))
    _require_gap(model, model.avgpool, "model.avgpool")
    head = model.classifier
    ok = (
        isinstance(head, nn.Sequential)
        and len(head) == 3
        and isinstance(head[0], nn.LayerNorm)
        and isinstance(head[1], nn.Flatten)
        and isinstance(head[2], nn.Linear)
    )
    if not ok or len(head[0].normalized_shape) != 1:
        raise _unsupported(model, "ConvNeXt .classifier is not LayerNorm2d(D), Flatten, Linear")
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
    features = _LayerNormedExtractor(
        model.features, eps=norm.eps, arch=_CONVNEXT_NAMES.get(key, "convnext"),
        out_channels=linear.in_features, nonnegative=False,
    )
    return features, weight, bias.clone()


def _split_vgg_gap(model: VGGGAP) -> _Split:
    _check_forward(model, VGGGAP, ("forward",))
    linear = _require_linear(model, model.classifier, "model.classifier")
    features = FeatureExtractor(
        model.features, arch=f"{model.arch}_gap", out_channels=linear.in_features,
        nonnegative=_ends_nonnegative(model.features),
    )
    return (features, *_weight_bias(linear))


def _nonneg_of(model: nn.Module | None, trunk: nn.Module) -> bool:
    flag = getattr(type(model), "features_nonnegative", None) if model is not None else None
    return bool(flag) if isinstance(flag, bool) else _ends_nonnegative(trunk)


def _split_generic(model: nn.Module) -> _Split | None:
    """``.features`` + Linear ``.classifier``/``.fc``; or Sequential(..., GAP, Flatten, [Dropout], Linear)."""
    trunk = getattr(model, "features", None)
    if isinstance(trunk, nn.Module):
        for name in ("classifier", "fc"):
            head = getattr(model, name, None)
            if isinstance(head, nn.Module):
                linear = _require_linear(model, head, f"model.{name}")
                features = FeatureExtractor(
                    trunk, arch=type(model).__name__, out_channels=linear.in_features,
                    nonnegative=_nonneg_of(model, trunk),
                )
                return (features, *_weight_bias(linear))
        return None
    if isinstance(model, nn.Sequential) and len(model) >= 3:
        mods = list(model)
        linear = mods[-1]
        if not isinstance(linear, nn.Linear):
            return None
        i = len(mods) - 2
        while i >= 0 and isinstance(mods[i], (nn.Dropout, nn.Identity, nn.Flatten)):
            i -= 1
        if i < 1 or not _is_gap(mods[i]) or not any(isinstance(m, nn.Flatten) for m in mods[i + 1 : -1]):
            return None
        trunk = model[:i]
        features = FeatureExtractor(
            trunk, arch="sequential", out_channels=linear.in_features, nonnegative=_ends_nonnegative(trunk)
        )
        return (features, *_weight_bias(linear))
    return None


# torchvision classes known NOT to be GAP + linear, with why (for the error message)
_KNOWN_UNSUPPORTED: dict[type, str] = {
    tvm.VGG: "torchvision VGG's classifier is a 3-layer MLP on a 7x7 pooled map (use vgg_gap to build a GAP + "
    "linear VGG)",
    tvm.AlexNet: "AlexNet's classifier is an MLP",
    tvm.SqueezeNet: "SqueezeNet's classifier is a conv followed by pooling, not a Linear",
    tvm.Inception3: "Inception v3 has auxiliary heads and input transforms in forward",
    tvm.GoogLeNet: "GoogLeNet has auxiliary heads and input transforms in forward",
    tvm.VisionTransformer: "a ViT classifies the class token, it has no conv feature map",
    tvm.SwinTransformer: "a Swin transformer has a channels-last trunk and a LayerNorm+permute head",
}


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def split_classifier(
    model: nn.Module | None,
    *,
    features: nn.Module | None = None,
    head: nn.Module | None = None,
) -> tuple[FeatureExtractor, torch.Tensor, torch.Tensor]:
    """Split a GAP + linear classifier into (features, weight, bias).

    Args:
        model: a supported classifier (see :func:`supported_architectures` and the module docstring), put in eval
            mode by the caller. Neither its mode nor its parameters are changed. May be None when ``features`` and
            ``head`` are given.
        features: explicit trunk, x [B, 3, H, W] -> [B, D, h, w]; must be given together with ``head``.
        head: explicit nn.Linear(D, C) (or Dropout/Flatten/Identity then Linear in an nn.Sequential), applied by the
            model to ``features(x).mean((2, 3))``.
    Returns:
        features: :class:`FeatureExtractor`, x [B, 3, H, W] -> [B, D, h, w] (shares the model's modules).
        weight: [C, D], detached copy.
        bias: [C], detached copy (zeros when the Linear has none), shift-compensated.
        In eval mode ``features(x).mean((2, 3)) @ weight.T + bias == model(x)`` to float tolerance.
    Raises:
        UnsupportedModelError: the head is not GAP + linear or the architecture is not recognised.
        TypeError: ``model`` is not an nn.Module, or only one of ``features``/``head`` is given.
    """
    if (features is None) != (head is None):
        raise TypeError(
            f"split_classifier: features and head must be given together. Expected both (a trunk module and an "
            f"nn.Linear) or neither; got features={type(features).__name__}, head={type(head).__name__}. Fix: pass "
            f"both, e.g. split_classifier(model, features=model.backbone, head=model.fc)."
        )
    if features is not None:
        return _split_explicit(model, features, head)  # type: ignore[arg-type]
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"split_classifier: model must be a torch.nn.Module. Expected an nn.Module classifier; got "
            f"{type(model).__name__}. Fix: pass the model object (e.g. torchvision.models.resnet34(...))."
        )
    with torch.no_grad():
        result = _dispatch(model)
    result[0].training = model.training  # mirror the model's mode without touching its modules
    return result


def _dispatch(model: nn.Module) -> _Split:
    for cls, reason in _KNOWN_UNSUPPORTED.items():
        if isinstance(model, cls):
            raise _unsupported(model, reason)
    if isinstance(model, tvm.ResNet):
        return _split_resnet(model)
    if isinstance(model, tvm.DenseNet):
        return _split_densenet(model)
    if isinstance(model, tvm.MobileNetV2):
        return _split_mobilenet_v2(model)
    if isinstance(model, tvm.MobileNetV3):
        return _split_mobilenet_v3(model)
    if isinstance(model, tvm.EfficientNet):
        return _split_efficientnet(model)
    if isinstance(model, tvm.ConvNeXt):
        return _split_convnext(model)
    if isinstance(model, VGGGAP):
        return _split_vgg_gap(model)
    result = _split_generic(model)
    if result is None:
        raise _unsupported(
            model,
            f"{type(model).__name__} has no recognisable GAP + linear head (no .features with a Linear "
            f".classifier/.fc, and not a Sequential ending in AdaptiveAvgPool2d(1), Flatten, Linear)",
        )
    return result


def _split_explicit(model: nn.Module | None, features: nn.Module, head: nn.Module) -> _Split:
    if not isinstance(features, nn.Module):
        raise TypeError(
            f"split_classifier: features must be an nn.Module. Expected the conv trunk, x [B, 3, H, W] -> "
            f"[B, D, h, w]; got {type(features).__name__}. Fix: pass a module, e.g. features=model.features."
        )
    linear = _final_linear(head) if isinstance(head, nn.Module) else None
    if linear is None:
        got = _seq_desc(head)
        raise UnsupportedModelError(
            f"split_classifier: head is not a linear layer. Expected an nn.Linear(D, C) applied to "
            f"features(x).mean((2, 3)) (optionally behind Dropout/Flatten/Identity in an nn.Sequential); got {got}. "
            f"Fix: pass the model's final nn.Linear as head; a head with hidden layers is not GAP + linear -- move "
            f"them into features, or use a supported architecture ({', '.join(supported_architectures())})."
        )
    extractor = FeatureExtractor(
        features, arch="custom", out_channels=linear.in_features, nonnegative=_nonneg_of(model, features)
    )
    extractor.training = features.training
    return (extractor, *_weight_bias(linear))


def verify_split(
    model: nn.Module,
    x: torch.Tensor,
    *,
    features: nn.Module | None = None,
    head: nn.Module | None = None,
    rtol: float = 1e-4,
) -> float:
    """Check ``features(x).mean((2, 3)) @ weight.T + bias == model(x)`` on a batch; useful for generic models.

    Args:
        model: the classifier, in eval mode.
        x: [B, 3, H, W] input batch.
        features, head: as in :func:`split_classifier`.
        rtol: tolerance relative to max(1, max |model(x)|).
    Returns:
        The max absolute logit difference.
    Raises:
        UnsupportedModelError: the difference exceeds ``rtol`` times the logit scale (the model's forward is not
            GAP + linear over the assumed trunk).
    """
    feats, weight, bias = split_classifier(model, features=features, head=head)
    with torch.no_grad():
        ref = model(x)
        got = feats(x).mean((2, 3)) @ weight.T + bias
    if got.shape != ref.shape:
        raise UnsupportedModelError(
            f"verify_split: the split's logits have the wrong shape. Expected model(x)'s shape {tuple(ref.shape)}; "
            f"got {tuple(got.shape)}. Fix: pass the trunk and Linear that the model's forward actually uses."
        )
    diff = float((got - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    if diff > rtol * scale:
        raise UnsupportedModelError(
            f"verify_split: the split does not reproduce the model's logits. Expected max |difference| <= "
            f"{rtol * scale:.3g} (rtol={rtol} x logit scale {scale:.3g}); got {diff:.3g}. Fix: make sure the model is "
            f"in eval mode and that its forward is linear(mean_hw(features(x))); otherwise pass features=/head= "
            f"explicitly."
        )
    return diff
