"""Prototype galleries: the training patches where a prototype's oriented map peaks highest, read from the stored
training features (no forward pass) and cropped from the few training images shown."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.method.head import PartPrototypeHead

__all__ = ["GalleryPatch", "gallery_patches"]


def default_patch_size(S: int) -> int:
    # The ProtoEval box (72 px at 224 px, scaled with the image): the region the evaluation credits a prototype with.
    return max(8, 2 * int(math.floor(36 * S / 224 + 0.5)))


def crop(image: torch.Tensor, cy: float, cx: float, size: int) -> torch.Tensor:
    """The ``size x size`` patch of ``image [3, H, W]`` centred at pixel ``(cy, cx)``, shifted to stay inside."""
    _, H, W = image.shape
    sh, sw = min(size, H), min(size, W)
    y0 = int(round(cy - sh / 2))
    x0 = int(round(cx - sw / 2))
    y0 = min(max(0, y0), H - sh)
    x0 = min(max(0, x0), W - sw)
    return image[:, y0 : y0 + sh, x0 : x0 + sw].clone()


@dataclass(frozen=True)
class GalleryPatch:
    """One gallery patch: ``patch [3, p, p]`` cut from training image ``dataset_index`` (``image_id``) around
    feature-map cell ``(row, col)``, where the prototype's oriented map reaches ``score``."""

    patch: torch.Tensor
    dataset_index: int
    image_id: str
    row: int
    col: int
    score: float


def gallery_patches(
    head: PartPrototypeHead,
    c: int,
    *,
    train_store: Any,
    train_dataset: Any,
    size: int = 6,
    patch_size: int | None = None,
) -> list[list[GalleryPatch]]:
    """The training patches that activate each of class ``c``'s prototypes most.

    For prototype i, the oriented map ``signs[c, i] * F_n . p~_{c,i}`` of every training image n of class c
    (``train_store.class_features(c)`` ``[n, h, w, D]``) is maximised over positions; the ``size`` images with the
    highest maxima (one patch per image) are cut from ``train_dataset`` around that cell's centre, a
    ``patch_size``-pixel square (default: the ProtoEval box, 36 px at 112 px).

    Returns ``k`` lists (prototype order) of up to ``size`` :class:`GalleryPatch`, best first.
    """
    C, k, D = head.prototypes.shape
    Fc = train_store.class_features(int(c))  # [n, h, w, D]
    if Fc.ndim != 4 or Fc.shape[-1] != D:
        raise ShapeError(
            f"train_store's class {c} features have shape {list(Fc.shape)}; expected [n, h, w, D={D}] matching the "
            "head's prototypes. Fix: pass the training feature store the head was decomposed from."
        )
    n, h, w, _ = Fc.shape
    if n == 0:
        return [[] for _ in range(k)]
    protos = head.prototypes[int(c)].detach().to("cpu", torch.float32)  # [k, D]
    signs = head.signs[int(c)].detach().to("cpu", torch.float32)  # [k]
    maps = torch.einsum("nhwd,kd->knhw", Fc.float(), protos) * signs.view(k, 1, 1, 1)  # [k, n, h, w]
    best, pos = maps.reshape(k, n, h * w).max(-1)  # [k, n]
    top = min(int(size), n)
    order = best.argsort(dim=1, descending=True)[:, :top]  # [k, top]
    indices = train_store.class_indices(int(c))
    ids = train_store.class_image_ids(int(c))
    cache: dict[int, torch.Tensor] = {}
    out: list[list[GalleryPatch]] = []
    for i in range(k):
        row_out = []
        for j in order[i].tolist():
            ds_index = int(indices[j])
            if j not in cache:
                item = train_dataset[ds_index]
                if str(item["image_id"]) != ids[j]:
                    raise InputValueError(
                        f"train_store and train_dataset disagree: store row {j} of class {c} is image {ids[j]!r}, "
                        f"but train_dataset[{ds_index}] is {item['image_id']!r}. Expected the dataset the store was "
                        "extracted from. Fix: pass the same training split (same seed, size and order)."
                    )
                cache[j] = item["image"]
            image = cache[j]
            S_h, S_w = image.shape[-2:]
            p = int(pos[i, j])
            r, col = divmod(p, w)
            size_px = patch_size if patch_size is not None else default_patch_size(min(S_h, S_w))
            patch = crop(image, (r + 0.5) * S_h / h, (col + 0.5) * S_w / w, size_px)
            row_out.append(GalleryPatch(patch, ds_index, ids[j], r, col, float(best[i, j])))
        out.append(row_out)
    return out
