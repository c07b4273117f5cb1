"""What the run report and the class pages share: the stylesheet, value formatting and escaping, argument checks,
the choice of test images, and the explanation of the chosen images through the head (one batched pass)."""

from __future__ import annotations

import base64
import copy
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.method.head import PartPrototypeHead

__all__ = ["CSS", "check_head_and_features", "class_names_of", "esc", "explain_classes", "format_value",
           "select_test_images", "torch_device"]


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1.5em 2em 4em; color: #222; line-height: 1.45; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.35em; margin-top: 2.2em; border-bottom: 2px solid #e3e3e3; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; color: #333; }
p.note, figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #d9d9d9; padding: 0.3em 0.8em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
caption { text-align: left; caption-side: top; padding-bottom: 0.3em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.ours td { font-weight: 600; background: #f4f9ff; }
figure { margin: 0.4em 0 1em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
nav ul { columns: 4; list-style: none; padding-left: 0; }
ul.why { margin-top: 0.2em; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
"""


def format_value(value: Any) -> str:
    """How a metric value is printed in the report: None -> ``"n/a"``, bool -> ``yes``/``no``, int as is, float
    with 4 significant digits (``f"{v:.4g}"``), dicts/lists as compact JSON, anything else ``str``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return format_value(value.item())
    if isinstance(value, (Mapping, list, tuple)):
        try:
            text = json.dumps(value, default=str, separators=(", ", ": "))
        except (TypeError, ValueError):
            text = str(value)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(value)


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def short(text: str, n: int = 28) -> str:
    """``text`` cut to its last ``n`` characters (ids end with what distinguishes them), for labels in images."""
    text = str(text)
    return text if len(text) <= n else "..." + text[-(n - 3):]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def check_pos_int(name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1; got {value!r}. Fix: {hint}")
    return int(value)


def labels_of(dataset: Any, who: str) -> list[int]:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise InputValueError(
            f"{who} has no labels attribute: expected a phpn dataset (phpn_core.data.base's contract: labels, "
            f"classes, mean, std, items with image/label/image_id); got {type(dataset).__name__}. Fix: add labels "
            "(all labels in item order)."
        )
    return [int(v) for v in labels]


def class_names_of(dataset: Any, C: int, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        names = [str(n) for n in given]
        if len(names) != C:
            raise ShapeError(f"class_names must hold C={C} names (one per head class); got {len(names)}.")
        return names
    names = getattr(dataset, "classes", None)
    if names is not None and len(names) == C:
        return [str(n) for n in names]
    return [f"class {c}" for c in range(C)]


def module_on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device`` without moving the caller's module (``nn.Module.to`` works in place)."""
    p = next(module.parameters(), None)
    if p is None or p.device == device:
        return module
    return copy.deepcopy(module).to(device)


def torch_device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise InputValueError(f"device {device!r} is not a torch device. Fix: pass 'cpu' or 'cuda'.") from None


def check_head_and_features(head: Any, features: Any) -> None:
    """What every page builder needs: a decomposed head and a feature module in eval mode."""
    if not isinstance(head, PartPrototypeHead):
        raise InputValueError(
            f"head must be a PartPrototypeHead; got {type(head).__name__}. Fix: load it with "
            "PrototypeRegistry(uri).load(entry_id)[0]."
        )
    check_features_module(features)


def check_features_module(features: Any) -> None:
    if not isinstance(features, torch.nn.Module):
        raise InputValueError(
            f"features must be an nn.Module (x [B, 3, S, S] normalised -> [B, D, h, w]); got "
            f"{type(features).__name__}. Fix: pass split_classifier(model)[0]."
        )
    training = [n or type(features).__name__ for n, m in features.named_modules()
                if m.training and isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.Dropout))]
    if training:
        raise InputValueError(
            f"features is in training mode ({len(training)} BatchNorm/Dropout modules, e.g. {training[:3]}): "
            "expected eval mode, else the heatmaps depend on the batch. Fix: call model.eval() before splitting."
        )


def select_test_images(dataset: Any, classes: Sequence[int], per_class: int) -> dict[int, list[int]]:
    """``{c: the first per_class dataset indices of class c}`` (dataset order); classes without images map to []."""
    labels = labels_of(dataset, "test_dataset")
    want = {int(c): [] for c in classes}
    for i, y in enumerate(labels):
        lst = want.get(y)
        if lst is not None and len(lst) < per_class:
            lst.append(i)
    return want


def explain_classes(head: PartPrototypeHead, features: torch.nn.Module, test_dataset: Any,
                     classes: Sequence[int], chosen: Mapping[int, list[int]], dev: torch.device
                     ) -> dict[int, dict[str, Any]]:
    """The chosen test images of ``classes`` (``chosen[c]``: dataset indices) through ``features`` and the head, in
    batches of 64 images across classes: ``{c: {"images" [n, 3, S, S], "ids", "contributions" [n, k], "oriented"
    [n, k, h, w], "logits" [n], "bias", "pred"}}`` for every class with at least one image."""
    flat = [i for c in classes for i in chosen[c]]
    items = [test_dataset[i] for i in flat]
    explained: dict[int, dict[str, Any]] = {}
    if items:
        x = torch.stack([it["image"] for it in items]).float()
        mean, std = getattr(test_dataset, "mean", None), getattr(test_dataset, "std", None)
        if mean is None or std is None:
            raise InputValueError(
                "test_dataset has no mean/std attributes: expected the normalisation its classifier was trained "
                "with (phpn dataset contract). Fix: add mean and std (3-tuples) to the dataset."
            )
        feats = module_on(features, dev)
        head_d = head if head.prototypes.device == dev else copy.deepcopy(head).to(dev)
        with torch.inference_mode():
            fmaps = torch.cat([feats(normalize(x[s : s + 64], mean, std).to(dev)) for s in range(0, len(x), 64)])
            if fmaps.dtype != head_d.prototypes.dtype:
                fmaps = fmaps.to(head_d.prototypes.dtype)
            logits_all = head_d(fmaps).cpu()  # [N, C]
            pos = 0
            for c in classes:
                n_c = len(chosen[c])
                if n_c == 0:
                    continue
                ex = head_d.explain(fmaps[pos : pos + n_c], classes=[c])
                explained[c] = {
                    "images": x[pos : pos + n_c],
                    "ids": [str(it["image_id"]) for it in items[pos : pos + n_c]],
                    "contributions": ex.contributions[:, 0].cpu(),  # [n, k]
                    "oriented": ex.oriented_heatmaps[:, 0].cpu(),  # [n, k, h, w]
                    "logits": ex.logits[:, 0].cpu(),  # [n]
                    "bias": float(ex.bias[0]),
                    "pred": logits_all[pos : pos + n_c].argmax(1).tolist(),
                }
                pos += n_c
    return explained
