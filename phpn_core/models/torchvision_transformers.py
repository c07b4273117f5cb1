"""torchvision transformer adapters: Swin v1/v2 (``swin_t/s/b``, ``swin_v2_t/s/b``) are split exactly; the CLS-token
Vision Transformer (``vit_*``) is refused with the reason and the fix.

Swin's forward is ``features -> norm (a per-token LayerNorm) -> permute to [B, D, h, w] -> AdaptiveAvgPool2d(1) ->
Flatten -> head (Linear)``. The LayerNorm acts on each token separately, so it belongs to the trunk: F(x) is the
LayerNormed token grid as a [B, D, h, w] map, its spatial mean feeds the Linear, and the split is exact with the
Linear's own weight and bias. F(x) is signed (``nonnegative = False``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from phpn_core.models.arch_names import (
    SWIN_NAMES,
    torchvision_transformer_architectures,
)
from phpn_core.models.extractor import (
    FeatureExtractor,
    Split,
    check_forward,
    require_gap,
    require_linear,
    unsupported,
    weight_bias,
)

VIT_REASON = (
    "a CLS-token Vision Transformer (torchvision vit_*) classifies the class token, not an average of the patch "
    "tokens, so its logits are not a linear function of a spatial feature map and no exact part decomposition "
    "exists. Fix: use a ViT with an average-pool head, e.g. timm.create_model('vit_small_patch16_224', "
    "global_pool='avg', num_classes=C) fine-tuned on your data (config model.arch: 'timm:<name>'), or a Swin "
    "(swin_t) / ConvNeXt backbone"
)


def architectures() -> list[str]:
    """The torchvision transformer names these adapters recognise (``FeatureExtractor.arch``)."""
    return torchvision_transformer_architectures()


class _SwinTrunk(nn.Module):
    """torchvision Swin: ``features`` then the per-token ``norm``, as [B, D, h, w] (shares the model's modules)."""

    def __init__(self, features: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.features(x)).permute(0, 3, 1, 2)  # [B, h, w, D] -> [B, D, h, w]


def _swin_name(model: tvm.SwinTransformer) -> str:
    try:
        dim = int(model.features[0][0].out_channels)
        stages = tuple(len(model.features[i]) for i in (1, 3, 5, 7))
        v2 = isinstance(model.features[1][0], tvm.swin_transformer.SwinTransformerBlockV2)
    except (TypeError, IndexError, AttributeError):
        return "swin"
    return SWIN_NAMES.get((dim, stages, v2), "swin")


def _split_swin(model: tvm.SwinTransformer) -> Split:
    check_forward(model, tvm.SwinTransformer, ("forward",))
    require_gap(model, model.avgpool, "model.avgpool")
    linear = require_linear(model, model.head, "model.head")
    if not isinstance(model.norm, nn.LayerNorm) or len(model.norm.normalized_shape) != 1:
        raise unsupported(model, f"Swin .norm is {type(model.norm).__name__}, not a per-token LayerNorm(D)")
    features = FeatureExtractor(
        _SwinTrunk(model.features, model.norm), arch=_swin_name(model), out_channels=linear.in_features,
        nonnegative=False,
    )
    return (features, *weight_bias(linear))


KNOWN_UNSUPPORTED: dict[type, str] = {tvm.VisionTransformer: VIT_REASON}

SPLITTERS: tuple[tuple[type, object], ...] = ((tvm.SwinTransformer, _split_swin),)
