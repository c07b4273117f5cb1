"""The feature-extractor module that every split returns, and the checks that every backbone adapter shares.

:class:`FeatureExtractor` maps x [B, 3, H, W] to the feature map F(x) [B, D, h, w] whose spatial mean feeds the
linear head; the helpers check a head's structure and build the (features, weight [C, D], bias [C]) triple.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phpn_core.errors import ShapeError, UnsupportedModelError
from phpn_core.models.arch_names import supported_architectures

NONNEG_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
PASSTHROUGH = (nn.Dropout, nn.Identity, nn.Flatten)

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


class PenultimateExtractor(FeatureExtractor):
    """MobileNet V3: trunk -> GAP -> head up to (not incl.) its last Linear, as a [B, D, 1, 1] map."""

    def __init__(self, body: nn.Module, pre_head: nn.Module, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.pre_head = pre_head

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.body(x).mean((2, 3))
        return self.pre_head(pooled)[:, :, None, None]


class LayerNormedExtractor(FeatureExtractor):
    """ConvNeXt: trunk map normalised per image with the LayerNorm statistics of its spatial mean.

    ``out_hw = (F_hw - mu(g)) / sqrt(var(g) + eps)``, g = mean_hw F [B, D]; so mean_hw(out) = LayerNorm(g) without
    its affine part (which is folded into the returned weight/bias).
    """

    def __init__(self, body: nn.Module, *, eps: float, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.eps = float(eps)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        return layernorm_map(self.body(x), self.eps)


def layernorm_map(fmap: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, D, h, w] -> (F_hw - mu(g)) / sqrt(var(g) + eps), g = mean_hw F [B, D]; statistics over channels.

    So mean_hw(result) = LayerNorm(g) without its affine part: a LayerNorm of the pooled vector (ConvNeXt's
    LayerNorm2d after pooling, a ViT's ``fc_norm``) is a per-image affine map of F, folded into weight/bias.
    """
    pooled = fmap.mean((2, 3), keepdim=True)  # [B, D, 1, 1]
    mu = pooled.mean(1, keepdim=True)
    var = pooled.var(1, unbiased=False, keepdim=True)  # LayerNorm uses the biased variance
    return (fmap - mu) * torch.rsqrt(var + eps)



# ----------------------------------------------------------------------------------------------------------------
# helpers


def final_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear of a head that is a Linear, or a Sequential of Dropout/Identity/Flatten then one Linear."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential) and len(head) > 0 and isinstance(head[-1], nn.Linear):
        if all(isinstance(m, PASSTHROUGH) for m in list(head)[:-1]):
            return head[-1]
    return None


def is_gap(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def ends_nonnegative(module: nn.Module) -> bool:
    """True when ``module`` is (or is a Sequential ending, recursively, in) a non-negative activation."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return isinstance(module, NONNEG_ACTIVATIONS)


def weight_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached copies of a Linear's weight [C, D] and bias [C] (zeros when it has none)."""
    weight = linear.weight.detach().clone()
    if linear.bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    else:
        bias = linear.bias.detach().clone()
    return weight, bias


def seq_desc(module: object) -> str:
    """Class name, with the children's class names for a Sequential (e.g. an MLP head)."""
    desc = type(module).__name__
    if isinstance(module, nn.Sequential):
        desc += "(" + ", ".join(type(m).__name__ for m in module) + ")"
    return desc


def describe(model: nn.Module) -> str:
    parts = [type(model).__name__]
    for name in ("features", "classifier", "fc", "head", "heads"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            parts.append(f".{name}={type(sub).__name__ if name == 'features' else seq_desc(sub)}")
    return " ".join(parts)


def unsupported(model: nn.Module, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"split_classifier: unsupported model: {reason}. Expected a global-average-pool + linear classifier, one "
        f"of: {', '.join(supported_architectures())}; or a module with .features (conv trunk) and a .classifier/.fc "
        f"that is an nn.Linear applied to the spatial mean of features(x); or an nn.Sequential ending in "
        f"AdaptiveAvgPool2d(1), Flatten, Linear. Got: {describe(model)}. Fix: pass the trunk and the linear head "
        f"explicitly, split_classifier(model, features=<trunk>, head=<nn.Linear>), or for VGG build the model with "
        f"phpn_core.models.split.vgg_gap(...)."
    )


def check_forward(model: nn.Module, cls: type, methods: tuple[str, ...]) -> None:
    """Refuse subclasses that override forward: the structural split would no longer match model(x)."""
    for name in methods:
        if getattr(type(model), name) is not getattr(cls, name):
            raise unsupported(
                model,
                f"{type(model).__name__} subclasses torchvision's {cls.__name__} but overrides {name}(), so its "
                f"head may no longer be the standard one",
            )


def require_linear(model: nn.Module, head: nn.Module, where: str) -> nn.Linear:
    linear = final_linear(head)
    if linear is None:
        raise unsupported(
            model,
            f"{where} is not a single nn.Linear (optionally behind Dropout/Flatten/Identity); it is {seq_desc(head)}",
        )
    return linear


def require_gap(model: nn.Module, pool: nn.Module, where: str) -> None:
    if not is_gap(pool):
        raise unsupported(model, f"{where} is {pool!r}, not AdaptiveAvgPool2d(1)")



Split = tuple[FeatureExtractor, torch.Tensor, torch.Tensor]
"""What every adapter returns: (features, weight [C, D], bias [C])."""


def shifted(features: FeatureExtractor, linear: nn.Linear, shift: float) -> Split:
    """Weight/bias for features that carry a constant shift s: bias = b - s * W.sum(1)."""
    weight, bias = weight_bias(linear)
    if shift != 0.0:
        bias = bias - shift * weight.sum(1)
    return features, weight, bias


