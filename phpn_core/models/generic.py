"""Adapters for models phpn does not know by class: ``.features`` + a Linear ``.classifier``/``.fc``, an
``nn.Sequential`` ending in GAP + Flatten + Linear, or an explicit ``features=`` / ``head=`` pair.
"""

from __future__ import annotations

from torch import nn

from phpn_core.errors import UnsupportedModelError
from phpn_core.models.arch_names import supported_architectures
from phpn_core.models.extractor import (
    FeatureExtractor,
    Split,
    ends_nonnegative,
    final_linear,
    is_gap,
    require_linear,
    seq_desc,
    weight_bias,
)


def _nonneg_of(model: nn.Module | None, trunk: nn.Module) -> bool:
    flag = getattr(type(model), "features_nonnegative", None) if model is not None else None
    return bool(flag) if isinstance(flag, bool) else ends_nonnegative(trunk)


def split_generic(model: nn.Module) -> Split | None:
    """``.features`` + Linear ``.classifier``/``.fc``; or Sequential(..., GAP, Flatten, [Dropout], Linear)."""
    trunk = getattr(model, "features", None)
    if isinstance(trunk, nn.Module):
        for name in ("classifier", "fc"):
            head = getattr(model, name, None)
            if isinstance(head, nn.Module):
                linear = require_linear(model, head, f"model.{name}")
                features = FeatureExtractor(
                    trunk, arch=type(model).__name__, out_channels=linear.in_features,
                    nonnegative=_nonneg_of(model, trunk),
                )
                return (features, *weight_bias(linear))
        return None
    if isinstance(model, nn.Sequential) and len(model) >= 3:
        mods = list(model)
        linear = mods[-1]
        if not isinstance(linear, nn.Linear):
            return None
        i = len(mods) - 2
        while i >= 0 and isinstance(mods[i], (nn.Dropout, nn.Identity, nn.Flatten)):
            i -= 1
        if i < 1 or not is_gap(mods[i]) or not any(isinstance(m, nn.Flatten) for m in mods[i + 1 : -1]):
            return None
        trunk = model[:i]
        features = FeatureExtractor(
            trunk, arch="sequential", out_channels=linear.in_features, nonnegative=ends_nonnegative(trunk)
        )
        return (features, *weight_bias(linear))
    return None


def split_explicit(model: nn.Module | None, features: nn.Module, head: nn.Module) -> Split:
    if not isinstance(features, nn.Module):
        raise TypeError(
            f"split_classifier: features must be an nn.Module. Expected the conv trunk, x [B, 3, H, W] -> "
            f"[B, D, h, w]; got {type(features).__name__}. Fix: pass a module, e.g. features=model.features."
        )
    linear = final_linear(head) if isinstance(head, nn.Module) else None
    if linear is None:
        got = seq_desc(head)
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
    return (extractor, *weight_bias(linear))



