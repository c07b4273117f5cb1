"""The feature store's schema of an extractor over a dataset, from one dry forward pass."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.extract.checks import check_device, check_dtype, check_eval_mode
from phpn_core.extract.contract import (
    classes_of,
    dataset_fingerprint,
    norm_stat,
    part_names_of,
    sample_image,
)
from phpn_core.storage.schema import FeatureSchema

__all__ = ["build_schema"]


def build_schema(
    features: nn.Module,
    dataset: Dataset,
    *,
    model: str | None = None,
    checkpoint_digest: str,
    split: str | None = None,
    layer: str = "features",
    input_size: int | None = None,
    dataset_name: str | None = None,
    dataset_fingerprint: str | None = None,
    dtype: Literal["float16", "float32"] = "float32",
    device: str | torch.device = "cpu",
) -> FeatureSchema:
    """The :class:`FeatureSchema` of ``features`` over ``dataset``, from one dry forward pass on the first image.

    Args:
        features: x ``[B, 3, S, S]`` (normalised) -> ``[B, D, h, w]``, in eval mode (e.g. from ``split_classifier``).
        dataset: a phpn dataset (see :mod:`phpn_core.data.base`).
        model: model name recorded in the schema; default ``features.arch``.
        checkpoint_digest: the weights' identity, e.g. :func:`phpn_core.models.spec.checkpoint_digest` (required:
            two different weights must never share a store).
        split: default ``dataset.split``.
        layer: which layer the features come from (recorded; default ``"features"``).
        input_size: expected image side S; checked against the dataset's images when given.
        dataset_name: default the dataset's class name.
        dataset_fingerprint: default :func:`dataset_fingerprint` of ``dataset``.
        dtype: storage dtype, ``"float32"`` or ``"float16"``.
        device: where the dry run runs (the module is moved there).

    ``feature_shape`` is ``(h, w, D)`` of the dry run, ``feature_shift`` is ``features.shift`` (0.0 if absent).
    """
    dev = check_device(device)
    check_eval_mode(features)
    check_dtype(dtype)
    if model is None:
        model = getattr(features, "arch", None)
        if not isinstance(model, str) or not model:
            raise InputValueError(
                f"model name missing: {type(features).__name__} has no .arch, so the name to record in the store "
                "cannot be inferred. Fix: pass model='resnet34' (or the spec's arch)."
            )
    if not isinstance(checkpoint_digest, str) or not checkpoint_digest:
        raise InputValueError(
            f"checkpoint_digest must be a non-empty string, got {checkpoint_digest!r}. Fix: pass "
            "phpn_core.models.spec.checkpoint_digest(path) ('none' for random weights)."
        )
    if split is None:
        split = getattr(dataset, "split", None)
        if not isinstance(split, str) or not split:
            raise InputValueError(
                f"split missing: {type(dataset).__name__} has no .split attribute. Fix: pass split='train' (or the "
                "split's name)."
            )
    classes = classes_of(dataset)
    n = len(dataset)
    if n == 0:
        raise InputValueError(f"{type(dataset).__name__} is empty: expected at least one image. Fix: check its root.")
    fp = _dataset_fingerprint_fn(dataset) if dataset_fingerprint is None else dataset_fingerprint
    sample = dataset[0]
    image = sample_image(sample, 0)
    S = int(image.shape[-1])
    if input_size is not None and int(input_size) != S:
        raise ShapeError(
            f"{type(dataset).__name__} gives {S}x{S} px images, but input_size={input_size} was requested. "
            f"Fix: build the dataset with image_size={input_size} (or pass input_size={S})."
        )
    mean, std = norm_stat(dataset, "mean"), norm_stat(dataset, "std")
    features.to(dev)
    with torch.inference_mode():
        out = features(normalize(image.unsqueeze(0).to(dev), mean, std))
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(
            f"{type(features).__name__} returned {got} for one image: expected a feature map [1, D, h, w]. "
            "Fix: pass the feature extractor from split_classifier(model), not the classifier."
        )
    _, D, h, w = out.shape
    return FeatureSchema(
        model=model,
        checkpoint_digest=checkpoint_digest,
        layer=layer,
        input_size=S,
        dataset=dataset_name or type(dataset).__name__,
        dataset_fingerprint=fp,
        split=split,
        dtype=dtype,
        feature_shift=float(getattr(features, "shift", 0.0)),
        n_images=n,
        n_classes=len(classes),
        feature_shape=(int(h), int(w), int(D)),
        class_names=classes,
        part_names=part_names_of(dataset),
    )


_dataset_fingerprint_fn = dataset_fingerprint  # build_schema's keyword of the same name shadows it
