"""The whole zoo: every entry of supported_architectures() and a representative timm set go through split ->
features -> decompose_head -> PartPrototypeHead, and the decomposed head reproduces model(x) exactly.

Cost control (the suite runs on 2 CPU cores): every torchvision architecture is split on the ``meta`` device
(structure, name recognition, output shapes, sign handling: no memory, no init, no arithmetic; ~15 s for all 47);
the numeric path (random weights, small inputs, decomposition, exact logits) runs on one or two representatives
per family, including every model of the issue's contract (torchvision convnext_tiny and swin_t; timm resnet50,
convnext_tiny, vit_small_patch16_224 with global_pool="avg").
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from phpn_core import PartPrototypeHead, decompose_head, split_classifier
from phpn_core.models.split import SILU_SHIFT, supported_architectures, vgg_gap
from phpn_core.models.timm_adapter import TIMM_CHECKED

torch.set_num_threads(2)
# few NMF iterations on purpose (exactness does not depend on convergence)
pytestmark = pytest.mark.filterwarnings("ignore::phpn_core.method.nmf.NMFConvergenceWarning")

C = 3  # classes
N_PER_CLASS = 1  # one image per class: h*w >= 4 rows per class suffice for k = 2
K = 2

# family prefix -> (nonnegative, shift) the split must report
_SIGNS = {
    "resnet": (True, 0.0), "resnext": (True, 0.0), "wide_resnet": (True, 0.0), "densenet": (True, 0.0),
    "mobilenet_v2": (True, 0.0), "mobilenet_v3": (True, 0.375), "efficientnet": (True, SILU_SHIFT),
    "convnext": (False, 0.0), "vgg": (True, 0.0), "swin": (False, 0.0),
}


def _build_tv(name: str) -> nn.Module:
    if name.endswith("_gap"):
        return vgg_gap(name[: -len("_gap")], num_classes=C)
    return getattr(tvm, name)(weights=None, num_classes=C)


def _expected_signs(name: str) -> tuple[bool, float]:
    for prefix in sorted(_SIGNS, key=len, reverse=True):
        if name.startswith(prefix):
            return _SIGNS[prefix]
    raise AssertionError(f"no expected sign handling for {name}")  # a new architecture: add it above


@pytest.mark.parametrize("name", supported_architectures())
def test_every_architecture_splits(name: str) -> None:
    """Structure on the meta device: the name is recognised, shapes fit, sign handling is the family's."""
    with torch.device("meta"):
        model = _build_tv(name).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MobileNet V3's "no spatial extent"
        features, weight, bias = split_classifier(model)
    nonneg, shift = _expected_signs(name)
    assert features.arch == name
    assert (features.nonnegative, features.shift) == (nonneg, shift)
    D = features.out_channels
    assert weight.shape == (C, D) and bias.shape == (C,)
    x = torch.empty(2, 3, 64, 64, device="meta")
    with torch.no_grad():
        fmap, logits = features(x), model(x)
    assert logits.shape == (2, C)
    assert fmap.shape[:2] == (2, D)
    assert (fmap.shape[2] * fmap.shape[3] > 1) != name.startswith("mobilenet_v3")


# ----------------------------------------------------------------------------------------------------------------
# the numeric path


def _calibrate_and_randomise(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running stats := batch x's (random-init eval activations otherwise vanish: a vacuous check), then
    eval mode; every Linear / LayerNorm affine random, so bias and gamma/beta folding are really exercised."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.momentum = 1.0
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # registered last, in every model here
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=gen) / classifier.in_features**0.5)
        classifier.bias.copy_(0.1 * torch.randn(classifier.bias.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


def _decompose_exactly(model: nn.Module, side: int, n_per_class: int = N_PER_CLASS) -> dict:
    torch.manual_seed(0)
    x = torch.randn(C * n_per_class, 3, side, side)
    labels = torch.arange(C).repeat_interleave(n_per_class)
    _calibrate_and_randomise(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features, weight, bias = split_classifier(model)
    with torch.no_grad():
        ref = model(x)
        F = features(x)  # [B, D, h, w]
    assert F.shape[:2] == (x.shape[0], weight.shape[1]) and F.shape[2] * F.shape[3] >= 1
    if features.nonnegative:
        assert float(F.min()) >= 0.0
    by_class = {c: F[labels == c].permute(0, 2, 3, 1) for c in range(C)}
    # few iterations: exactness does not depend on convergence (the refinement closes v_c = sum p~ exactly)
    hd = decompose_head(by_class, weight, K, refine_iter=5, nmf_options={"max_iter": 50})
    head = PartPrototypeHead.from_decomposition(hd, bias)
    with torch.no_grad():
        got = head(F)
    scale = float(ref.abs().max())
    assert scale > 1e-3, "vacuous: the model's logits are ~0"
    diff = float((got - ref).abs().max())
    assert diff <= 1e-4 * scale, f"max |head(F) - model(x)| = {diff:.3g}, logit scale {scale:.3g}"
    return {"features": features, "F": F, "hd": hd}


# torchvision: one or two per family (the structure of every name is checked above)
# (DenseNet, Swin v2 and the deeper variants: their splits are numerically checked in test_split.py or share the
# code path of a representative here; the decomposition path does not depend on the family beyond the sign)
TV_NUMERIC = {
    "resnet18": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64, "convnext_tiny": 64,
    "vgg11_gap": 32, "swin_t": 64,
}


@pytest.mark.parametrize("name", list(TV_NUMERIC))
def test_torchvision_zoo_decomposes_exactly(name: str) -> None:
    torch.manual_seed(0)
    # MobileNet V3's map is 1x1: two images per class give the k = 2 rows a class needs
    out = _decompose_exactly(_build_tv(name), TV_NUMERIC[name], 2 if name.startswith("mobilenet_v3") else 1)
    assert out["features"].arch == name
    assert out["features"].nonnegative is _expected_signs(name)[0]


TIMM_CASES = [
    pytest.param(name, kwargs, id=f"{name}{'-' + '-'.join(f'{k}={v}' for k, v in kwargs.items()) if kwargs else ''}")
    for family in TIMM_CHECKED.values()
    for name, kwargs in family
]


@pytest.mark.parametrize("name, kwargs", TIMM_CASES)
def test_timm_zoo_decomposes_exactly(name: str, kwargs: dict) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=C, **kwargs)
    side = int(kwargs.get("img_size", 64))
    out = _decompose_exactly(model, side)
    features = out["features"]
    assert features.arch == f"timm:{name}"
    if name.startswith(("convnext", "swin", "vit")):
        assert features.nonnegative is False and float(out["F"].min()) < 0.0  # signed: handled behind the calls
    if name.startswith("vit"):
        assert out["F"].shape[2:] == (side // 16, side // 16)  # the patch grid, class token dropped
