"""Faithfulness axioms, as measured numbers (0 up to float rounding for a faithful explanation; each has a test with a
deliberately broken explanation for which it is large):

- :func:`completeness_error`: ``contributions.sum(-1) + bias == logits`` (and ``heatmaps.mean == contributions``);
- :func:`sensitivity_check`: removing prototype i changes the logit by exactly its contribution (so a prototype
  with zero contribution changes nothing);
- :func:`linearity_check`: the explanation of ``a * head_a + b * head_b`` is ``a * expl_a + b * expl_b``;
- :func:`symmetry_check`: two identical feature channels with equal prototype weights get identical per-channel
  attributions (:func:`channel_attributions`).
"""

from __future__ import annotations

import math

import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.evaluation._checks import (
    _desc,
    _require_tensor,
)
from phpn_core.method.head import Explanation, PartPrototypeHead

__all__ = ['completeness_error', 'sensitivity_check', 'linearity_check', 'symmetry_check', 'channel_attributions']


def _check_fmap_for(head: PartPrototypeHead, fmap: torch.Tensor, who: str) -> None:
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"{who}: head must be a PartPrototypeHead; got {type(head).__name__}.")
    _require_tensor(f"{who}: fmap", fmap, 4, "[B, D, H, W]")
    if fmap.shape[1] != head.prototypes.shape[2]:
        raise ShapeError(f"{who}: fmap has D={fmap.shape[1]} channels, the head D={head.prototypes.shape[2]}; got "
                         f"{_desc(fmap)} (expected [B, D, H, W], channels first).")


def _model_logits(prototypes: torch.Tensor, bias: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
    """The decomposed model's logits ``[B, C]`` (ground truth for the axioms, independent of any ``explain``)."""
    return PartPrototypeHead(prototypes, bias)(fmap)


def completeness_error(explanation: Explanation, *, logits: torch.Tensor | None = None,
                       include_heatmaps: bool = True) -> float:
    """Completeness: ``max |contributions.sum(-1) + bias - logits|`` over images and classes.

    Args:
        explanation: an :class:`~phpn_core.method.head.Explanation` (contributions ``[B, C, k]``, bias ``[C]``,
            logits ``[B, C]``, heatmaps ``[B, C, k, H, W]``).
        logits: ``[B, C]`` the model's logits to explain (default: ``explanation.logits``). Pass the original
            model's logits to test the explanation against the model rather than against itself.
        include_heatmaps: also take the max with ``|heatmaps.mean((-2, -1)) - contributions|`` (the "where" maps
            add up to the "what").

    Returns:
        The largest deviation (0 up to float rounding for a complete explanation).
    """
    if not isinstance(explanation, Explanation):
        raise TypeError(f"completeness_error: expected an Explanation; got {type(explanation).__name__}.")
    contrib, bias = explanation.contributions, explanation.bias
    target = explanation.logits if logits is None else logits
    _require_tensor("completeness_error: contributions", contrib, 3, "[B, C, k]")
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(contrib.shape[:2]):
        raise ShapeError(f"completeness_error: logits must have shape [B, C]={tuple(contrib.shape[:2])}; got "
                         f"{_desc(target)}.")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (contrib.shape[1],):
        raise ShapeError(f"completeness_error: bias must have shape [C={contrib.shape[1]}]; got {_desc(bias)}.")
    err = float((contrib.sum(-1) + bias - target.to(contrib)).abs().max()) if contrib.numel() else 0.0
    if include_heatmaps:
        hm = explanation.heatmaps
        if not isinstance(hm, torch.Tensor) or hm.ndim != 5 or tuple(hm.shape[:3]) != tuple(contrib.shape):
            raise ShapeError(f"completeness_error: heatmaps must have shape [B, C, k, H, W] with [B, C, k]="
                             f"{tuple(contrib.shape)}; got {_desc(hm)}.")
        if hm.numel():
            err = max(err, float((hm.mean((-2, -1)) - contrib).abs().max()))
    return err


def sensitivity_check(head: PartPrototypeHead, fmap: torch.Tensor) -> float:
    """Sensitivity: removing (zeroing) prototype i of every class changes each logit by exactly its contribution.

    For each i, the model's logits with and without prototype i (computed by the plain decomposed model, not by
    ``head.explain``) differ by ``delta [B, C]``; the explanation's ``contributions[:, :, i]`` must equal it. In
    particular a prototype with zero contribution changes nothing.

    Args:
        head: the head whose ``explain`` is checked (``[C, k, D]``); fmap: ``[B, D, H, W]``.

    Returns:
        ``max_{b,c,i} |delta_i - contributions[:, :, i]|``.
    """
    _check_fmap_for(head, fmap, "sensitivity_check")
    with torch.no_grad():
        ex = head.explain(fmap)
        protos, bias = head.prototypes, head.bias
        full = _model_logits(protos, bias, fmap)
        dev = 0.0
        for i in range(protos.shape[1]):
            removed = protos.clone()
            removed[:, i] = 0
            delta = full - _model_logits(removed, bias, fmap)
            dev = max(dev, float((delta - ex.contributions[:, :, i]).abs().max()))
    return dev


def linearity_check(head_a: PartPrototypeHead, head_b: PartPrototypeHead, fmap: torch.Tensor,
                    a: float, b: float) -> float:
    """Linearity: the explanation of ``a * head_a + b * head_b`` is ``a * expl_a + b * expl_b``.

    The combined head has prototypes ``a P_a + b P_b`` and bias ``a b_a + b b_b`` and is built as
    ``type(head_a)(prototypes, bias)`` (both heads must be of one type, so that the same explanation method is
    checked). Compared: contributions ``[B, C, k]`` and raw heatmaps ``[B, C, k, H, W]``.

    Returns:
        The largest absolute deviation.
    """
    _check_fmap_for(head_a, fmap, "linearity_check")
    _check_fmap_for(head_b, fmap, "linearity_check")
    if type(head_a) is not type(head_b):
        raise TypeError(f"linearity_check: head_a and head_b must be of one type; got {type(head_a).__name__} and "
                        f"{type(head_b).__name__}.")
    if head_a.prototypes.shape != head_b.prototypes.shape:
        raise ShapeError(f"linearity_check: heads must have the same [C, k, D]; got {tuple(head_a.prototypes.shape)} "
                         f"and {tuple(head_b.prototypes.shape)}.")
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputValueError(f"linearity_check: {name} must be a finite number; got {v!r}.")
    with torch.no_grad():
        combined = type(head_a)(a * head_a.prototypes + b * head_b.prototypes, a * head_a.bias + b * head_b.bias)
        ea, eb, eab = head_a.explain(fmap), head_b.explain(fmap), combined.explain(fmap)
        dc = (eab.contributions - (a * ea.contributions + b * eb.contributions)).abs().max()
        dh = (eab.heatmaps - (a * ea.heatmaps + b * eb.heatmaps)).abs().max()
    return float(torch.maximum(dc, dh))


def channel_attributions(head: PartPrototypeHead, fmap: torch.Tensor, *,
                         classes: list[int] | None = None) -> torch.Tensor:
    """Per-channel attribution of each prototype's contribution: ``mean_hw(F[:, d]) * p~[c, i, d]``.

    Args:
        head: ``[C, k, D]``; fmap: ``[B, D, H, W]``; classes: optional subset of classes (C' of them).

    Returns:
        ``[B, C', k, D]``; summing over D gives the contributions ``[B, C', k]``.
    """
    _check_fmap_for(head, fmap, "channel_attributions")
    protos = head.prototypes
    if classes is not None:
        idx = torch.as_tensor(classes, dtype=torch.long, device=protos.device)
        if idx.ndim != 1 or bool(((idx < 0) | (idx >= protos.shape[0])).any()):
            raise InputValueError(
                f"channel_attributions: classes must be ints in [0, {protos.shape[0]}); got {classes}."
            )
        protos = protos[idx]
    pooled = fmap.mean((2, 3))  # [B, D]
    return pooled[:, None, None, :] * protos[None]


def symmetry_check(head: PartPrototypeHead, fmap: torch.Tensor, i: int, j: int, *, attribution=channel_attributions,
                   atol: float = 1e-6) -> float:
    """Symmetry preservation: identical channels i and j with equal prototype weights get identical attributions.

    Args:
        head: ``[C, k, D]``; fmap: ``[B, D, H, W]`` with ``fmap[:, i] == fmap[:, j]``.
        i, j: the two channels; the prototypes must satisfy ``p~[..., i] == p~[..., j]``.
        attribution: ``(head, fmap) -> [B, C, k, D]`` the per-channel attribution checked
            (default :func:`channel_attributions`).
        atol: tolerance of the premise check.

    Returns:
        ``max |attr[..., i] - attr[..., j]|``.

    Raises:
        InputValueError: the premise does not hold (the channels or the prototype weights differ by more than
            ``atol``): the axiom says nothing then. Fix: copy channel i onto j in both.
    """
    _check_fmap_for(head, fmap, "symmetry_check")
    D = fmap.shape[1]
    for name, v in (("i", i), ("j", j)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < D:
            raise InputValueError(f"symmetry_check: {name} must be a channel index in [0, {D}); got {v!r}.")
    if not torch.allclose(fmap[:, i], fmap[:, j], rtol=0, atol=atol):
        raise InputValueError(
            f"symmetry_check: channels {i} and {j} of fmap differ (max |diff| "
            f"{float((fmap[:, i] - fmap[:, j]).abs().max()):.3g} > atol={atol}); the axiom needs identical channels. "
            f"Fix: fmap[:, {j}] = fmap[:, {i}]."
        )
    P = head.prototypes
    if not torch.allclose(P[..., i], P[..., j], rtol=0, atol=atol):
        raise InputValueError(
            f"symmetry_check: the prototypes' weights on channels {i} and {j} differ (max |diff| "
            f"{float((P[..., i] - P[..., j]).abs().max()):.3g} > atol={atol}); the axiom needs equal weights."
        )
    with torch.no_grad():
        attr = attribution(head, fmap)
    B, C, k = fmap.shape[0], P.shape[0], P.shape[1]
    if not isinstance(attr, torch.Tensor) or tuple(attr.shape) != (B, C, k, D):
        raise ShapeError(f"symmetry_check: attribution must return [B, C, k, D]={(B, C, k, D)}; got {_desc(attr)}.")
    return float((attr[..., i] - attr[..., j]).abs().max())
