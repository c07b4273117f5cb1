"""Argument checks and small helpers shared by the evaluation modules (errors say expected vs. got).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

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


_NOISE_SEED_STRIDE = 1_000_003


def _noise_like(x: torch.Tensor, indices: Sequence[int], *, seed: int, noise_std: float, noise_clip: float
                ) -> torch.Tensor:
    """``clip(N(0, noise_std), -noise_clip, noise_clip)`` shaped like ``x [B, ...]``; image i seeded by its index.

    ProtoEval's stability noise (:mod:`~phpn_core.evaluation.protoeval`); the keypoint-free box stability
    (:mod:`~phpn_core.evaluation.keypoint_free`) draws the same noise for the same image and seed."""
    g = torch.Generator(device="cpu")
    rows = []
    for i in indices:
        g.manual_seed((seed * _NOISE_SEED_STRIDE + int(i)) % (1 << 63))
        rows.append(torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32))
    noise = torch.stack(rows) * noise_std
    return noise.clamp(-noise_clip, noise_clip).to(x.device, x.dtype)


def _box_bounds(peaks: torch.Tensor, H: int, W: int, hy: int, hx: int):
    """ProtoEval's box around each peak: ``peaks [..., 2]`` (row, col) -> ``(y1, y2, x1, x2)``, each float64
    ``[..., 1]``: ``[row - hy, row + hy] x [col - hx, col + hx]`` clipped to ``[0, H] x [0, W]``."""
    r, c = peaks[..., 0:1].double(), peaks[..., 1:2].double()
    return (r - hy).clamp_min(0), (r + hy).clamp_max(H), (c - hx).clamp_min(0), (c + hx).clamp_max(W)


def check_active(active, n_classes: int, who: str) -> torch.Tensor | None:
    """``active`` as a bool ``[n_classes, k]`` CPU tensor (or None); k is checked against the maps later."""
    if active is None:
        return None
    if not isinstance(active, torch.Tensor) or active.ndim != 2 or active.shape[0] != n_classes:
        raise ShapeError(f"{who}: active must be a bool tensor [C={n_classes}, k] (the prototypes in use); got "
                         f"{_desc(active)}.")
    return active.detach().to("cpu", torch.bool)


def masked_mean(values: torch.Tensor, active: torch.Tensor | None) -> float:
    """Mean of ``values [..., k]`` over the active prototypes (``active`` bool, broadcast; None: all)."""
    if active is None:
        return float(values.double().mean())
    a = active.to(device=values.device, dtype=torch.bool).expand_as(values)
    return float(values.double()[a].mean()) if bool(a.any()) else float("nan")


def check_active_k(active: torch.Tensor | None, k: int, who: str) -> None:
    """``active [C, k']`` must have one column per map (``k``)."""
    if active is not None and active.shape[1] != k:
        raise ShapeError(f"{who}: active has k={active.shape[1]} columns, maps_fn gives k={k} maps; expected one "
                         f"column per prototype map.")
