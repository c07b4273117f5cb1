"""Argument checks and small helpers shared by the evaluation modules (errors say expected vs. got).
"""

from __future__ import annotations

import copy
import math

import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.method.head import PartPrototypeHead

__all__ = []


def _desc(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _require_tensor(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}; got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ShapeError(f"{name}: expected shape {layout}; got {_desc(x)}.")
    return x


def _require_float(name: str, value, *, minimum: float = 0.0, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise InputValueError(f"{name} must be a finite number >= {minimum}; got {value!r}. {hint}")
    return float(value)


def _require_pos_int(name: str, value, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1; got {value!r}. {hint}")
    return value


def _module_device(module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _check_eval_mode(module, who: str) -> None:
    if isinstance(module, torch.nn.Module) and module.training:
        raise InputValueError(
            f"{who}: features_module is in training mode (BatchNorm/Dropout would make the feature maps depend on "
            f"the batch and on chance); expected eval mode. Fix: call features_module.eval() first."
        )


def _resolve_norm(mean, std, source, who: str):
    if mean is None:
        mean = getattr(source, "mean", None)
    if std is None:
        std = getattr(source, "std", None)
    if mean is None or std is None:
        raise InputValueError(
            f"{who}: no normalisation given and the dataset has no mean/std attributes; expected images in [0, 1] "
            f"and their normalisation. Fix: pass mean=..., std=... (mean=(0, 0, 0), std=(1, 1, 1) when the batches "
            f"are already normalised)."
        )
    return mean, std


def _head_on(head: PartPrototypeHead, device: torch.device) -> PartPrototypeHead:
    """The head on ``device`` without moving the caller's module (nn.Module.to works in place)."""
    if head.prototypes.device == device:
        return head
    return copy.deepcopy(head).to(device)
