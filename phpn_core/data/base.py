"""The one sample contract every phpn dataset follows.

A dataset is a ``torch.utils.data.Dataset`` whose items are :class:`Sample` dicts:

- ``image``: float32 tensor ``[3, S, S]`` with values in ``[0, 1]`` (not normalised; models normalise with the
  dataset's ``mean``/``std`` through :func:`normalize`, so that ProtoEval's stability noise can be added to the
  normalised input),
- ``label``: int in ``[0, len(classes))``,
- ``image_id``: str, unique within the dataset and stable across runs,
- ``keypoints`` (only where the dataset has parts): float32 tensor ``[P, 3]`` with rows ``(x, y, visible)``,
  ``x``/``y`` in pixel coordinates of the returned image, ``visible`` in ``{0, 1}``.

Every dataset also exposes ``classes: list[str]``, ``part_names: list[str] | None``, ``mean``, ``std``
(3-tuples) and ``labels: list[int]`` (all labels in item order, so that class-contiguous ordering can be
computed without decoding images).
"""

from __future__ import annotations

from typing import TypedDict

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _SampleRequired(TypedDict):
    image: torch.Tensor
    label: int
    image_id: str


class Sample(_SampleRequired, total=False):
    keypoints: torch.Tensor


def normalize(images: torch.Tensor, mean, std, *, inplace: bool = False) -> torch.Tensor:
    """Normalise images ``[B, 3, H, W]`` (or ``[3, H, W]``) in ``[0, 1]``; returns a new tensor, same shape.

    ``inplace=True`` (floating-point images only) overwrites ``images`` with the same values instead: for a batch
    the caller owns, it spares two batch-sized allocations (page faults and memory traffic a small model notices).
    """
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    if inplace and images.is_floating_point():
        return images.sub_(m).div_(s)
    return (images - m) / s
