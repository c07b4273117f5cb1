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
swin_t/s/b, swin_v2_t/s/b                         per-token LayerNormed token grid  0       **no**
timm:<name> (:mod:`.timm_adapter`)                ``forward_features`` as a map     read    read off
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

Swin (torchvision, :mod:`.torchvision_transformers`): ``features -> norm -> permute -> avgpool -> head``; the
LayerNorm is per token, so F(x) is the normed token grid [B, D, h, w] and the Linear is used as is. Signed.

timm models (any class defined in timm) go to :func:`phpn_core.models.timm_adapter.split_timm`, which uses timm's
API (``forward_features``, ``forward_head``, ``get_classifier``), folds a LayerNorm of the pooled vector (ConvNeXt's
head norm, a ViT's ``fc_norm``) as for ConvNeXt above, reads the sign handling off the module that produced the
features, and checks the split on a probe batch. timm is imported only then.

Unsupported (raise :class:`~phpn_core.errors.UnsupportedModelError`): heads that are not GAP + linear, e.g. torchvision
VGG/AlexNet (MLP classifiers; use :func:`vgg_gap`), Inception/GoogLeNet, CLS-token ViTs (torchvision ``vit_*``, timm
``global_pool='token'``: use an average-pool head, timm ``global_pool='avg'``), SqueezeNet, or a model whose
``classifier`` is an MLP. Pass ``features=`` and ``head=`` explicitly for anything else that is GAP + linear.
"""

from __future__ import annotations

import torch
from torch import nn

from phpn_core.errors import UnsupportedModelError
from phpn_core.models import torchvision_cnn, torchvision_transformers
from phpn_core.models.arch_names import supported_architectures
from phpn_core.models.extractor import FeatureExtractor, Split, unsupported
from phpn_core.models.generic import split_explicit, split_generic
from phpn_core.models.torchvision_cnn import (
    HARDSWISH_SHIFT,
    SILU_SHIFT,
    VGGGAP,
    vgg_gap,
)

__all__ = [
    "FeatureExtractor",
    "HARDSWISH_SHIFT",
    "SILU_SHIFT",
    "VGGGAP",
    "split_classifier",
    "supported_architectures",
    "supported_timm_families",
    "verify_split",
    "vgg_gap",
]


def supported_timm_families() -> list[str]:
    """The timm model families whose split is checked (tests/models/test_zoo.py); see
    :mod:`phpn_core.models.timm_adapter` (its ``TIMM_CHECKED`` names the models). Other timm models with an
    average-pool (+ LayerNorm) + Linear head are accepted too: every timm split is checked on a probe batch.
    Does not import timm."""
    from phpn_core.models.timm_adapter import timm_families

    return timm_families()


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
        return split_explicit(model, features, head)  # type: ignore[arg-type]
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"split_classifier: model must be a torch.nn.Module. Expected an nn.Module classifier; got "
            f"{type(model).__name__}. Fix: pass the model object (e.g. torchvision.models.resnet34(...))."
        )
    with torch.no_grad():
        result = _dispatch(model)
    result[0].training = model.training  # mirror the model's mode without touching its modules
    return result


def _dispatch(model: nn.Module) -> Split:
    from phpn_core.models import timm_adapter  # does not import timm by itself

    if timm_adapter.is_timm_model(model):
        return timm_adapter.split_timm(model)
    for module in (torchvision_cnn, torchvision_transformers):
        for cls, reason in module.KNOWN_UNSUPPORTED.items():
            if isinstance(model, cls):
                raise unsupported(model, reason)
    for module in (torchvision_cnn, torchvision_transformers):
        for cls, splitter in module.SPLITTERS:
            if isinstance(model, cls):
                return splitter(model)  # type: ignore[operator]
    result = split_generic(model)
    if result is None:
        raise unsupported(
            model,
            f"{type(model).__name__} has no recognisable GAP + linear head (no .features with a Linear "
            f".classifier/.fc, and not a Sequential ending in AdaptiveAvgPool2d(1), Flatten, Linear)",
        )
    return result


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

