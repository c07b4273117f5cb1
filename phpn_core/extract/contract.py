"""The dataset contract as extraction reads it: ids, labels, classes, parts, normalisation, one sample's image, and
the dataset's fingerprint (the feature store's identity), all without decoding more than one image."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from phpn_core.errors import InputValueError, ShapeError

__all__ = ["dataset_fingerprint", "image_ids_of", "labels_of", "classes_of", "part_names_of", "norm_stat",
           "sample_image", "contract_error"]

# Dataset attributes that never change the pixels (paths, error policies), left out of the fingerprint; the ids of
# skipped images are in it anyway (they are missing from image_ids).
_FINGERPRINT_SKIP = frozenset(
    {"root", "on_error", "max_pixels", "skipped", "skip_reasons", "labels", "image_ids", "classes", "part_names"}
)



def dataset_fingerprint(dataset: Dataset) -> str:
    """A short stable digest (16 hex chars) of what a dataset holds, computed without decoding any image.

    Covers the dataset class (module and name), ``classes``, ``part_names``, every image id and label (in item
    order), ``image_size``, ``mean``/``std``, and the dataset's public scalar settings (e.g. SynthParts' ``seed`` and
    ``omit_prob``, CUB's ``crop_to_bbox``); not its root path or error policy (moving the files changes nothing;
    images skipped as unreadable are absent from the ids).
    """
    ids = image_ids_of(dataset)
    labels = labels_of(dataset, len(ids))
    ident = {
        "type": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "classes": [str(c) for c in classes_of(dataset)],
        "part_names": part_names_of(dataset),
        "image_ids": ids,
        "labels": labels,
        "image_size": _jsonable_scalar(getattr(dataset, "image_size", None)),
        "mean": [float(v) for v in norm_stat(dataset, "mean")],
        "std": [float(v) for v in norm_stat(dataset, "std")],
        "config": _scalar_config(dataset),
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _scalar_config(dataset: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(vars(dataset).items()):
        if k.startswith("_") or k in _FINGERPRINT_SKIP:
            continue
        if isinstance(v, (tuple, list)) and len(v) <= 64 and all(_is_scalar(x) for x in v):
            out[k] = [_jsonable_scalar(x) for x in v]
        elif _is_scalar(v):
            out[k] = _jsonable_scalar(v)
    return out


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_))


def _jsonable_scalar(v: Any) -> Any:
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else repr(float(v))
    return v


def contract_error(dataset: Any, what: str) -> InputValueError:
    return InputValueError(
        f"{type(dataset).__name__} does not follow phpn's dataset contract: {what}. Expected a dataset like those "
        "in phpn_core.data (items with image/label/image_id, and attributes classes, labels, image_ids or "
        "image_id(i), mean, std). Fix: add the missing attribute to the dataset."
    )


def image_ids_of(dataset: Any) -> list[str]:
    ids = getattr(dataset, "image_ids", None)
    if ids is not None and not callable(ids):
        ids = [str(s) for s in ids]
    elif callable(getattr(dataset, "image_id", None)):
        ids = [str(dataset.image_id(i)) for i in range(len(dataset))]
    else:
        raise contract_error(dataset, "it has neither an image_ids list nor an image_id(i) method")
    if len(ids) != len(dataset):
        raise contract_error(dataset, f"len(image_ids) = {len(ids)} but len(dataset) = {len(dataset)}")
    return ids


def labels_of(dataset: Any, n: int) -> list[int]:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise contract_error(dataset, "it has no labels attribute (all labels in item order)")
    out = [int(v) for v in labels]
    if len(out) != n:
        raise contract_error(dataset, f"len(labels) = {len(out)} but len(dataset) = {n}")
    return out


def classes_of(dataset: Any) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if classes is None or len(classes) == 0:
        raise contract_error(dataset, "it has no (or an empty) classes attribute")
    return [str(c) for c in classes]


def part_names_of(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "part_names", None)
    return None if names is None else [str(p) for p in names]


def norm_stat(dataset: Any, name: str) -> tuple[float, ...]:
    v = getattr(dataset, name, None)
    if v is None:
        raise contract_error(dataset, f"it has no {name} attribute (per-channel normalisation {name})")
    return tuple(float(x) for x in v)



def sample_image(sample: Any, i: int) -> torch.Tensor:
    image = sample.get("image") if isinstance(sample, Mapping) else None
    ok = isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3
    if not ok or image.shape[1] != image.shape[2]:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ShapeError(
            f"dataset item {i} has an invalid image: expected a float tensor [3, S, S] in [0, 1] under 'image', got "
            f"{got}. Fix: follow phpn_core.data.base's sample contract."
        )
    return image
