"""Accuracy parity: the decomposed head against the original on the same feature maps.

    :func:`accuracy_parity` runs the original head (``GAP(F) @ W^T + b``) and the decomposed head (sum of the
    prototype contributions + b) on the *same* feature maps and reports both accuracies and the largest logit
    difference; :func:`head_reconstruction_error` is ``max |sum_i p~_{c,i} - v_c|``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.evaluation._checks import (
    _check_eval_mode,
    _desc,
    _module_device,
    _require_pos_int,
    _require_tensor,
    _resolve_norm,
)
from phpn_core.method.head import PartPrototypeHead

__all__ = ['accuracy_parity', 'head_reconstruction_error']


def _collate_xy(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def _feature_batches(features_module, source, *, batch_size: int, mean, std, device, who: str
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(fmap [B, D, h, w], labels [B])`` from a dataset, a loader, or precomputed feature maps."""
    if features_module is None:  # precomputed feature maps
        if isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(t, torch.Tensor) for t in source):
            fmaps, labels = source
            _require_tensor(f"{who}: precomputed feature maps", fmaps, 4, "[N, D, h, w]")
            if labels.ndim != 1 or labels.shape[0] != fmaps.shape[0]:
                raise ShapeError(
                    f"{who}: labels must have shape [N={fmaps.shape[0]}] to match the feature maps; got "
                    f"{_desc(labels)}."
                )
            for i in range(0, fmaps.shape[0], batch_size):
                yield fmaps[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
            return
        for batch in source:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise InputValueError(
                    f"{who}: with features_module=None, expected (feature maps [N, D, h, w], labels [N]) or an "
                    f"iterable of such batches; got a batch of type {type(batch).__name__}."
                )
            fm, lab = batch
            _require_tensor(f"{who}: precomputed feature maps", fm, 4, "[B, D, h, w]")
            yield fm.to(device), torch.as_tensor(lab).to(device)
        return

    if isinstance(source, Dataset) and not isinstance(source, DataLoader) and hasattr(source, "__len__"):
        mean, std = _resolve_norm(mean, std, source, who)
        loader: Iterable = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=0,
                                      collate_fn=_collate_xy)
    else:
        mean, std = _resolve_norm(mean, std, getattr(source, "dataset", None), who)
        loader = source
    with torch.no_grad():
        for batch in loader:
            if isinstance(batch, dict):
                x, y = batch["image"], batch["label"]
            elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
                x, y = batch[0], batch[1]
            else:
                raise InputValueError(
                    f"{who}: a loader batch must be a dict with 'image' and 'label' or a tuple (images, labels); got "
                    f"{type(batch).__name__}."
                )
            x = normalize(torch.as_tensor(x), mean, std).to(device)
            yield features_module(x), torch.as_tensor(y).to(device)


def accuracy_parity(
    features_module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head: PartPrototypeHead,
    loader_or_dataset,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    mean=None,
    std=None,
) -> dict:
    """Accuracy of the original and the decomposed head on the same feature maps.

    Original logits: ``F.mean((2, 3)) @ weight.T + bias``. Decomposed logits: ``sum_i mean_hw(F . p~_{c,i}) + b_c``
    (the sum of the prototype contributions plus the head's bias). Both come from the same feature maps, so any
    difference is the decomposition's.

    Args:
        features_module: images ``[B, 3, S, S]`` (normalised) -> feature maps ``[B, D, h, w]``, in eval mode; or None
            when ``loader_or_dataset`` holds precomputed feature maps.
        weight: ``[C, D]`` the original linear head; bias: ``[C]`` or None (zeros).
        head: the :class:`PartPrototypeHead` (C classes, D channels).
        loader_or_dataset: a dataset following :mod:`phpn_core.data.base`'s contract (images in [0, 1], normalised
            here with ``mean``/``std``, default the dataset's), a DataLoader/iterable of ``(images, labels)`` or
            ``{"image", "label"}`` batches (images in [0, 1]); or, with ``features_module=None``, a tuple
            ``(fmaps [N, D, h, w], labels [N])`` or an iterable of such batches.
        device: where to compute (default: the features module's device).
        batch_size: images per batch for datasets and precomputed tensors.

    Returns:
        ``{"accuracy_original", "accuracy_decomposed"}`` (fractions in [0, 1]), ``"max_abs_logit_diff"``,
        ``"prediction_agreement"`` (fraction of images with the same argmax), ``"n_images"``.
    """
    who = "accuracy_parity"
    _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"{who}: head must be a PartPrototypeHead; got {type(head).__name__}.")
    C, k, D = head.prototypes.shape
    _require_tensor(f"{who}: weight", weight, 2, "[C, D]")
    if tuple(weight.shape) != (C, D):
        raise ShapeError(f"{who}: weight must have shape [C={C}, D={D}] like the head; got {_desc(weight)}.")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C,)):
        raise ShapeError(f"{who}: bias must have shape [C={C}] or be None; got {_desc(bias)}.")
    if features_module is not None:
        _check_eval_mode(features_module, who)
    dev = _module_device(features_module, device)
    dtype = head.prototypes.dtype
    W = weight.detach().to(dev, dtype)
    b = (bias.detach() if bias is not None else torch.zeros(C)).to(dev, dtype)
    protos, hbias = head.prototypes.detach().to(dev), head.bias.detach().to(dev)
    n = correct_o = correct_d = agree = 0
    max_diff = 0.0
    with torch.no_grad():
        for fmap, labels in _feature_batches(features_module, loader_or_dataset, batch_size=batch_size, mean=mean,
                                             std=std, device=dev, who=who):
            if fmap.shape[1] != D:
                raise ShapeError(f"{who}: feature maps have D={fmap.shape[1]} channels, the head D={D}; got "
                                 f"{_desc(fmap)} (expected [B, D, h, w], channels first).")
            pooled = fmap.to(dtype).mean((2, 3))  # [B, D]
            orig = pooled @ W.T + b
            dec = torch.einsum("bd,ckd->bck", pooled, protos).sum(-1) + hbias
            labels = labels.long()
            po, pd = orig.argmax(1), dec.argmax(1)
            correct_o += int((po == labels).sum())
            correct_d += int((pd == labels).sum())
            agree += int((po == pd).sum())
            max_diff = max(max_diff, float((orig - dec).abs().max()) if orig.numel() else 0.0)
            n += labels.shape[0]
    if n == 0:
        raise InputValueError(f"{who}: no images; expected a non-empty dataset or loader.")
    return {
        "accuracy_original": correct_o / n, "accuracy_decomposed": correct_d / n,
        "max_abs_logit_diff": max_diff, "prediction_agreement": agree / n, "n_images": n,
    }


def head_reconstruction_error(head: PartPrototypeHead, weight: torch.Tensor) -> float:
    """``max_{c,d} |sum_i p~_{c,i,d} - v_{c,d}|`` for prototypes ``[C, k, D]`` and ``weight [C, D]``."""
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"head_reconstruction_error: head must be a PartPrototypeHead; got {type(head).__name__}.")
    _require_tensor("head_reconstruction_error: weight", weight, 2, "[C, D]")
    C, _, D = head.prototypes.shape
    if tuple(weight.shape) != (C, D):
        raise ShapeError(f"head_reconstruction_error: weight must have shape [C={C}, D={D}]; got {_desc(weight)}.")
    w = weight.detach().to(head.prototypes.device, head.prototypes.dtype)
    return float((head.prototypes.sum(1) - w).abs().max())
