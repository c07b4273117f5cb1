"""Argument checks of the feature store (labels, ids, keypoint shapes, indices) and the wording of layout diffs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.storage.schema import FeatureSchema

__all__ = ["as_array", "check_image_ids", "check_index", "check_keypoints_shape", "check_labels",
           "check_positive_int", "fmt_diff"]


def as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16
        arr = t.numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise InputValueError(
            f"{name} must be real numbers: expected a float or integer tensor/array, got dtype {arr.dtype}. "
            f"Fix: convert {name} to float32."
        )
    return arr


def check_labels(labels: Any, schema: FeatureSchema) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().to("cpu").numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != schema.n_images:
        raise ShapeError(
            f"labels have the wrong shape: expected [n_images] = [{schema.n_images}], got {list(arr.shape)}. "
            "Fix: pass one label per image, in dataset order (schema.n_images must match)."
        )
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr))):
        raise InputValueError(
            f"labels must be integers: expected class indices in [0, {schema.n_classes}), got dtype {arr.dtype}. "
            "Fix: pass integer class indices."
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= schema.n_classes:
        raise InputValueError(
            f"labels out of range: expected class indices in [0, {schema.n_classes}), got values in "
            f"[{int(arr.min())}, {int(arr.max())}]. Fix: map labels to 0..n_classes-1 or correct n_classes."
        )
    return arr


def check_image_ids(image_ids: Any, n: int) -> list[str]:
    if isinstance(image_ids, str) or not isinstance(image_ids, (Sequence, np.ndarray)):
        raise InputValueError(
            f"image_ids must be a sequence of strings, got {type(image_ids).__name__}. Fix: pass a list of ids."
        )
    ids = list(image_ids)
    if len(ids) != n:
        raise ShapeError(
            f"image_ids have the wrong length: expected [n_images] = [{n}], got [{len(ids)}]. "
            "Fix: pass one id per image, in dataset order."
        )
    bad = next((i for i, s in enumerate(ids) if not isinstance(s, str) or not s), None)
    if bad is not None:
        raise InputValueError(
            f"image_ids must be non-empty strings: got {ids[bad]!r} at index {bad}. Fix: give every image an id."
        )
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(s for s in ids if s in seen or seen.add(s))
        raise InputValueError(
            f"image_ids must be unique: expected {n} distinct ids, got {len(set(ids))} (e.g. {dup!r} repeats). "
            "Fix: make the ids unique within the dataset."
        )
    return ids


def check_keypoints_shape(keypoints_shape: Any, schema: FeatureSchema) -> tuple[int, int] | None:
    if keypoints_shape is None:
        return None
    shape = (keypoints_shape, 3) if isinstance(keypoints_shape, (int, np.integer)) else tuple(keypoints_shape)
    if (
        len(shape) != 2
        or shape[1] != 3
        or isinstance(shape[0], bool)
        or not isinstance(shape[0], (int, np.integer))
        or shape[0] < 1
    ):
        raise ShapeError(
            f"keypoints_shape is invalid: expected P or (P, 3) with P >= 1 parts, got {keypoints_shape!r}. "
            "Fix: pass the number of parts, e.g. keypoints_shape=(15, 3)."
        )
    P = int(shape[0])
    if schema.part_names is not None and len(schema.part_names) != P:
        raise ShapeError(
            f"keypoints_shape disagrees with the schema: expected P = len(part_names) = {len(schema.part_names)}, "
            f"got P = {P}. Fix: make part_names and the keypoints agree."
        )
    return P, 3


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1, got {value!r}. Fix: pass e.g. 16, or None for the default.")
    return int(value)


def check_index(name: str, value: Any, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputValueError(f"{name} must be an int, got {type(value).__name__}. Fix: pass an int in [0, {size}).")
    if not 0 <= value < size:
        raise InputValueError(
            f"{name} out of range: expected an int in [0, {size}), got {int(value)}. Fix: pass a valid index."
        )
    return int(value)


def fmt_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    if not diff:
        return "none of the identity fields (fingerprint format changed)"
    return ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
