"""timm adapter: split a timm classifier through timm's own API (``forward_features``, ``forward_head``,
``get_classifier``), then check the split numerically on a small probe batch.

timm computes ``logits = forward_head(forward_features(x))``. phpn accepts the heads that are an average pool,
optionally a LayerNorm of the pooled vector, then one Linear (``get_classifier()``):

==========================================  =========================================  ==============================
timm family (examples)                      F(x) [B, D, h, w]                          shift / signed
==========================================  =========================================  ==============================
ResNet, ResNeXt, RegNet (``resnet50``, ...)  ``forward_features(x)`` (NCHW)            ReLU: none, non-negative
EfficientNet (``efficientnet_b0``)          ``forward_features(x)`` (NCHW)             SiLU: + ``SILU_SHIFT``
ConvNeXt (``convnext_tiny``, ``_atto``)      forward_features normalised per image      signed
                                            with the LayerNorm statistics of its mean
                                            (the LayerNorm2d after pooling, folded)
Swin (``swin_tiny_patch4_window7_224``)     ``forward_features(x)`` (NHWC, LayerNormed  signed
                                            tokens) permuted to NCHW
ViT/DeiT/BEiT/EVA with ``global_pool='avg'``  the patch tokens (prefix tokens dropped)  signed
                                            on their [h, w] grid; with ``fc_norm`` also
                                            normalised per image (folded as ConvNeXt)
==========================================  =========================================  ==============================

Whether F(x) is non-negative is read off the module that produced ``forward_features``' output on the probe
batch (a forward hook on every leaf module, not attribute guessing): ReLU-like -> non-negative; SiLU/Swish -> the
SiLU shift; Hardswish -> the Hardswish shift (both compensated in the bias, as for torchvision); anything else ->
signed (``nonnegative = False``).

The LayerNorm fold. With g = mean_hw F (what the head pools) and LN(g) = gamma * (g - mu(g)) / sigma(g) + beta,
``features(x)_hw = (F_hw - mu(g)) / sigma(g)`` (statistics over channels, sigma = sqrt(var + eps)), ``weight =
W * gamma``, ``bias = b + W @ beta``: exact for every input.

Refused (:class:`~phpn_core.errors.UnsupportedModelError` saying why and how to fix): class-token pooling
(``global_pool='token'``, timm's default ViT/DeiT), attention pooling (``global_pool='map'``), max / avg-max / no
pooling, pooling that includes the prefix tokens, MLP heads (``NormMlpClassifierHead`` with a hidden layer, timm
MobileNetV3's ``conv_head`` after pooling), 1x1-conv classifiers, distilled two-head models, subclasses that
override ``forward``, and anything whose ``forward_head(forward_features(x))`` the split does not reproduce on the
probe batch (relative 1e-4).

timm itself is imported only when a timm model is split or built; importing this module does not import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phpn_core.errors import ShapeError, UnsupportedModelError
from phpn_core.models.extractor import (
    FeatureExtractor,
    Split,
    layernorm_map,
    weight_bias,
)
from phpn_core.models.torchvision_cnn import (  # the same shifts as for torchvision
    HARDSWISH_SHIFT,
    SILU_SHIFT,
)

_NONNEG_ACTS = {"ReLU", "ReLU6", "Sigmoid", "Hardsigmoid", "HardSigmoid", "HardSigmoidMe", "Softplus"}
_SILU_ACTS = {"SiLU", "Swish", "SwishMe"}
_HARDSWISH_ACTS = {"Hardswish", "HardSwish", "HardSwishMe"}
_AVG_POOLS = {"avg", "fast", "fastavg"}
_PROBE_SIDE = 64  # probe images for models that accept any size: >= 2x2 at stride 32 (a 1x1 map hides max vs avg)
_RTOL = 1e-4

#: timm families whose split tests/models/test_zoo.py checks (split, features, decomposition, exact logits), with
#: the models used and the keyword options they are built with.
TIMM_CHECKED: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "resnet": (("resnet50", {}),),
    "regnet": (("regnetx_002", {}),),
    "efficientnet": (("efficientnet_b0", {}),),
    "convnext": (("convnext_atto", {}), ("convnext_tiny", {})),
    "swin": (("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}),),
    "vit_avg": (
        ("vit_small_patch16_224", {"global_pool": "avg", "img_size": 32}),
        ("vit_small_patch16_224", {"global_pool": "avg", "img_size": 32, "fc_norm": False}),
    ),
}


def timm_families() -> list[str]:
    """The timm families whose split is checked (``TIMM_CHECKED`` holds the models and options used)."""
    return list(TIMM_CHECKED)


def is_timm_model(model: object) -> bool:
    """True when ``model`` is an instance of a class defined in timm (checked without importing timm)."""
    return any(cls.__module__.split(".")[0] == "timm" for cls in type(model).__mro__[:-1])


# ----------------------------------------------------------------------------------------------------------------
# the extractor


class _TimmTrunk(nn.Module):
    """``model.forward_features`` as a [B, D, h, w] map. Shares the model (the whole model is its child)."""

    def __init__(self, model: nn.Module, *, layout: str, prefix_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.layout = layout  # "NCHW", "NHWC" or "NLC" (tokens)
        self.prefix_tokens = int(prefix_tokens)

    def to_map(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """forward_features' output -> [B, D, h, w]; ``size`` is the input's (H, W) (for the token grid)."""
        if self.layout == "NCHW":
            return raw
        if self.layout == "NHWC":
            return raw.permute(0, 3, 1, 2)
        tokens = raw[:, self.prefix_tokens :]
        h, w = _token_grid(self.model, size)
        if h * w != tokens.shape[1]:
            raise ShapeError(
                f"timm {type(self.model).__name__}: the patch tokens do not form the patch grid. Expected "
                f"{h} x {w} = {h * w} patch tokens after the {self.prefix_tokens} prefix tokens; got "
                f"{tokens.shape[1]} (forward_features output {tuple(raw.shape)}). Fix: feed images of the size the "
                f"model was built for ({_probe_side(self.model)} px), or build it with dynamic_img_size=True."
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_map(self.model.forward_features(x), (int(x.shape[-2]), int(x.shape[-1])))


class _TimmExtractor(FeatureExtractor):
    """F(x) from a timm trunk; with ``eps`` set, normalised per image by the LayerNorm statistics of its mean."""

    def __init__(self, body: _TimmTrunk, *, eps: float | None, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.eps = None if eps is None else float(eps)

    def finish(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap if self.eps is None else layernorm_map(fmap, self.eps)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.body(x))


def _token_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        h, w = pe.dynamic_feat_size(size)
        return int(h), int(w)
    grid = getattr(pe, "grid_size", None)
    if grid is None:
        raise UnsupportedModelError(
            f"timm {type(model).__name__}: cannot find the patch grid of its tokens. Expected .patch_embed.grid_size "
            f"(as timm's VisionTransformer has); got patch_embed={type(pe).__name__}. Fix: use a timm ViT-family "
            f"model with an average-pool head, or pass features=/head= explicitly."
        )
    return int(grid[0]), int(grid[1])


def _probe_side(model: nn.Module) -> tuple[int, int] | int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None and not getattr(model, "dynamic_img_size", False):
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else int(size)
    return _PROBE_SIDE


# ----------------------------------------------------------------------------------------------------------------
# splitting


def _refuse(model: nn.Module, reason: str, fix: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"split_classifier: unsupported timm model: {reason}. Expected a timm classifier whose head is an average "
        f"pool (optionally a LayerNorm of the pooled vector) then one nn.Linear (checked families: "
        f"{', '.join(timm_families())}). Got: {type(model).__name__} (module {type(model).__module__}). Fix: {fix}."
    )


_AVG_FIX = (
    "use an average-pool head, e.g. timm.create_model(name, global_pool='avg', num_classes=C) and fine-tune it; or "
    "pass split_classifier(model, features=<trunk>, head=<nn.Linear>) for a GAP + linear model"
)


def _pool_type(pool: Any) -> str:
    return str(getattr(pool, "pool_type", "?")).lower()


def _head_plan(model: nn.Module) -> tuple[str, int, nn.Module | None]:
    """(layout, prefix tokens, LayerNorm of the pooled vector or None) of a timm model's head; refuses others."""
    from timm.layers import ClassifierHead, NormMlpClassifierHead

    head = getattr(model, "head", None)
    if isinstance(head, NormMlpClassifierHead):
        if not isinstance(head.pre_logits, nn.Identity):
            raise _refuse(model, "its head is an MLP (NormMlpClassifierHead with a hidden layer: pool, norm, "
                          "Linear + activation, Linear), not linear in the pooled features", _AVG_FIX)
        _require_avg(model, head.global_pool)
        norm = None if isinstance(head.norm, nn.Identity) else head.norm
        return "NCHW", 0, norm
    if isinstance(head, ClassifierHead):
        _require_avg(model, head.global_pool)
        return str(getattr(head, "input_fmt", "NCHW")), 0, None
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):  # ViT-like: pools tokens in forward_head
        if not hasattr(model, "num_prefix_tokens"):
            raise _refuse(model, f"it pools with global_pool={pool!r} but has no num_prefix_tokens, so phpn cannot "
                          "tell its token layout", _AVG_FIX)
        if getattr(model, "attn_pool", None) is not None or pool == "map":
            raise _refuse(model, "its head uses attention pooling (global_pool='map'): the pooled vector is an "
                          "attention-weighted, input-dependent mixture of tokens, not their average", _AVG_FIX)
        if pool == "token":
            raise _refuse(model, "it classifies the class token (global_pool='token', timm's default for ViT/DeiT), "
                          "not an average of the patch tokens, so its logits are not linear in a spatial map",
                          "use an average-pool head, e.g. timm global_pool='avg' (timm.create_model("
                          "'vit_small_patch16_224', global_pool='avg', num_classes=C)) and fine-tune it")
        if pool != "avg":
            raise _refuse(model, f"its token pooling is global_pool={pool!r}, not 'avg'", _AVG_FIX)
        if getattr(model, "pool_include_prefix", False):
            raise _refuse(model, "its average includes the prefix (class/register) tokens, which have no place on "
                          "the patch grid", "build it with pool_include_prefix=False")
        if getattr(model, "head_dist", None) is not None:
            raise _refuse(model, "it is a distilled two-head model (head and head_dist averaged)", _AVG_FIX)
        fc_norm = getattr(model, "fc_norm", None)
        norm = None if fc_norm is None or isinstance(fc_norm, nn.Identity) else fc_norm
        return "NLC", int(model.num_prefix_tokens), norm
    if isinstance(pool, nn.Module):
        _require_avg(model, pool)
        return "NCHW", 0, None
    raise _refuse(model, f"phpn does not recognise its head ({type(head).__name__ if head is not None else 'no .head'}"
                  f", global_pool={type(pool).__name__})", _AVG_FIX)


def _require_avg(model: nn.Module, pool: nn.Module) -> None:
    kind = _pool_type(pool)
    if kind not in _AVG_POOLS:
        what = "no pooling" if kind in ("", "none") else f"pool_type={kind!r}"
        raise _refuse(model, f"its global pooling is {what}, not an average", _AVG_FIX)


def _owner_of_forward(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if "forward" in cls.__dict__:
            return cls
    return type(model)  # pragma: no cover - nn.Module defines forward


def split_timm(model: nn.Module) -> Split:
    """Split a timm classifier (see the module docstring). Neither its mode nor its parameters are changed.

    Returns:
        (features, weight [C, D], bias [C]); ``features(x).mean((2, 3)) @ weight.T + bias == model(x)`` in eval mode.
    Raises:
        UnsupportedModelError: the head is not average pool (+ LayerNorm) + Linear, or the probe check fails.
    """
    for name in ("forward_features", "forward_head", "get_classifier"):
        if not callable(getattr(model, name, None)):
            raise _refuse(model, f"it has no {name}() (timm's classifier API)", _AVG_FIX)
    owner = _owner_of_forward(model)
    if owner.__module__.split(".")[0] != "timm":
        raise _refuse(model, f"{owner.__name__} overrides forward(), so model(x) may no longer be "
                      "forward_head(forward_features(x))", "split the timm model itself, or pass features=/head=")
    linear = model.get_classifier()
    if not isinstance(linear, nn.Linear):
        got = "no classifier (num_classes=0)" if isinstance(linear, nn.Identity) else type(linear).__name__
        raise _refuse(model, f"its classifier (get_classifier()) is {got}, not an nn.Linear",
                      "build it with num_classes=C and a Linear classifier (use_conv=False)")
    layout, prefix, norm = _head_plan(model)
    eps = None
    weight, bias = weight_bias(linear)
    if norm is not None:
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise _refuse(model, f"the norm of its pooled vector is {type(norm).__name__}, not a LayerNorm(D)",
                          _AVG_FIX)
        eps = norm.eps
        with torch.no_grad():
            w = weight
            gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(w[0])
            beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(w[0])
            weight, bias = (w * gamma[None, :]).clone(), (bias + w @ beta).clone()
    trunk = _TimmTrunk(model, layout=layout, prefix_tokens=prefix)
    shift, nonneg = _probe(model, trunk, linear, eps, weight, bias)
    features = _TimmExtractor(
        trunk, eps=eps, arch=f"timm:{_timm_name(model)}", out_channels=linear.in_features, nonnegative=nonneg,
        shift=shift,
    )
    if shift != 0.0:
        bias = bias - shift * weight.sum(1)
    return features, weight, bias


def _timm_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(arch or type(model).__name__)


class _EvalMode:
    """Put every submodule in eval mode for the probe, then restore each one's own flag exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        for m, _ in self.flags:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _probe(
    model: nn.Module, trunk: _TimmTrunk, linear: nn.Linear, eps: float | None, weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[float, bool]:
    """Run one small probe batch in eval mode: find F(x)'s producer (-> shift, nonnegative) and check the split.

    Returns (shift, nonnegative). Raises UnsupportedModelError when the split does not reproduce
    forward_head(forward_features(x)).
    """
    side = _probe_side(model)
    h, w = side if isinstance(side, tuple) else (side, side)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    in_chans = int(getattr(model, "in_chans", None) or getattr(getattr(model, "patch_embed", None), "in_chans", 3) or 3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_chans, h, w, generator=gen).to(device=device, dtype=dtype)

    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor):
            passthrough = bool(inputs) and out is inputs[0] and type(mod).__name__ not in _ACTS
            if not passthrough:
                calls.append((mod, out))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad(), _EvalMode(model):
            raw = model.forward_features(x)
            for handle in handles:
                handle.remove()
            handles = []
            ref = model.forward_head(raw)
            if not isinstance(raw, torch.Tensor) or raw.dim() not in (3, 4):
                raise _refuse(model, f"forward_features returned {type(raw).__name__} "
                              f"{tuple(raw.shape) if isinstance(raw, torch.Tensor) else ''}, not a [B, C, H, W] "
                              "map, a [B, H, W, C] map or [B, N, C] tokens", _AVG_FIX)
            channel_axis = {"NCHW": 1, "NHWC": 3, "NLC": 2}[trunk.layout]
            if raw.dim() != (3 if trunk.layout == "NLC" else 4) or raw.shape[channel_axis] != linear.in_features:
                raise _refuse(model, f"forward_features returned {tuple(raw.shape)} ({trunk.layout} expected, "
                              f"{linear.in_features} channels = the classifier's in_features): the head does more "
                              "than pool + (LayerNorm) + Linear, e.g. an MLP (timm MobileNetV3's conv_head after "
                              "pooling)", _AVG_FIX)
            fmap = trunk.to_map(raw, (h, w))
            producer = calls[-1] if calls else None
            if eps is not None or trunk.layout != "NCHW" or producer is None or producer[1] is not raw:
                shift, nonneg = 0.0, False
            else:
                act = type(producer[0]).__name__
                shift = SILU_SHIFT if act in _SILU_ACTS else HARDSWISH_SHIFT if act in _HARDSWISH_ACTS else 0.0
                nonneg = act in _NONNEG_ACTS or shift != 0.0
            finished = fmap if eps is None else layernorm_map(fmap, eps)
            pooled = finished.mean((2, 3))
            got = pooled @ weight.T + bias
    finally:
        for handle in handles:
            handle.remove()
    if got.shape != ref.shape:
        raise _refuse(model, f"the split's logits have shape {tuple(got.shape)} but forward_head gives "
                      f"{tuple(ref.shape)}", _AVG_FIX)
    scale = float((pooled.abs() @ weight.abs().T + bias.abs()).max())
    diff = float((got - ref).abs().max())
    if not diff <= _RTOL * max(scale, 1e-12):
        raise _refuse(model, f"the split does not reproduce forward_head(forward_features(x)) on a probe batch: max "
                      f"|difference| {diff:.3g} > {_RTOL} x the logit scale {scale:.3g}; its head does more than "
                      "average pool + (LayerNorm) + Linear", _AVG_FIX)
    if nonneg and float(finished.min()) + shift < 0.0:  # pragma: no cover - the producer's range guarantees it
        shift, nonneg = 0.0, False
    return shift, nonneg


_ACTS = _NONNEG_ACTS | _SILU_ACTS | _HARDSWISH_ACTS | {"GELU", "Tanh", "LeakyReLU", "PReLU", "Mish", "ELU"}
