"""The push (prototype projection) of ProtoPNet (official ``push.py``, class-specific).

Each prototype j of class c is replaced by the latent vector ``z[:, y, x]`` (add-on space, ``[d]``) of the training
patch of class c nearest to it; the record says which image and cell it came from and how far it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.protopnet.model import ProtoPNet

__all__ = ["PushRecord", "push_prototypes", "dataset_labels", "dataset_norm"]


@dataclass(frozen=True)
class PushRecord:
    """Where every prototype was pushed to (``P`` prototypes).

    Attributes:
        image_index: long ``[P]``, the dataset index of the image the prototype now comes from.
        cell: long ``[P, 2]``, the ``(y, x)`` cell of that image's latent map ``[d, h, w]``.
        distance: float ``[P]``, the squared L2 distance from the prototype *before* the push to that patch (the
            smallest over all patches of its class).
        prototype_classes: long ``[P]``, each prototype's class (the recorded image has this label).
        feature_size: ``(h, w)`` of the latent map.
    """

    image_index: torch.Tensor
    cell: torch.Tensor
    distance: torch.Tensor
    prototype_classes: torch.Tensor
    feature_size: tuple[int, int]

    def to_dict(self) -> dict:
        """JSON-ready lists."""
        return {"image_index": self.image_index.tolist(), "cell": self.cell.tolist(),
                "distance": self.distance.tolist(), "prototype_classes": self.prototype_classes.tolist(),
                "feature_size": list(self.feature_size)}


def dataset_labels(dataset) -> list[int]:
    """All labels of a dataset (its ``labels`` attribute, else read item by item)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    return [int(v) for v in labels]


def dataset_norm(dataset, mean, std, who: str):
    """``(mean, std)``: the given ones, else the dataset's; a clear error when neither exists."""
    mean = getattr(dataset, "mean", None) if mean is None else mean
    std = getattr(dataset, "std", None) if std is None else std
    if mean is None or std is None:
        raise InputValueError(
            f"{who}: no normalisation given and the dataset has no mean/std attributes; expected images in [0, 1] "
            f"and their normalisation. Fix: pass mean=..., std=... (e.g. the dataset's)."
        )
    return mean, std


def push_prototypes(
    model: ProtoPNet,
    dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    mean=None,
    std=None,
) -> PushRecord:
    """Replace each prototype by its nearest own-class training patch in add-on space (in place).

    The model is run in eval mode on the dataset's images as they are (no augmentation, normalised with
    ``mean``/``std``, default the dataset's); for prototype j of class c, the patch ``z_n[:, y, x]`` minimising
    ``||z_n[:, y, x] - p_j||^2`` over the images n with label c and their cells is found (the first in dataset
    order, then row-major, on ties) and copied into ``model.prototypes[j, :, 0, 0]``. This changes ``model`` (that
    is what a push is); the model's train/eval mode is restored afterwards. ``dataset`` is not changed.

    Args:
        model: a :class:`ProtoPNet`.
        dataset: the training set (items with ``image [3, S, S]`` in [0, 1] and ``label``); every class needs an
            image.
        batch_size: images per forward pass.
        device: where to compute (default: the model's device).
        mean, std: normalisation (default ``dataset.mean``/``dataset.std``).

    Returns:
        :class:`PushRecord`.

    Raises:
        InputValueError: a class has no image in ``dataset``, a label is out of range, or a bad option.
    """
    who = "push_prototypes"
    if not isinstance(model, ProtoPNet):
        raise TypeError(f"{who}: model must be a ProtoPNet; got {type(model).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputValueError(f"{who}: batch_size must be an int >= 1; got {batch_size!r}.")
    mean, std = dataset_norm(dataset, mean, std, who)
    labels = torch.tensor(dataset_labels(dataset), dtype=torch.long)
    C, P = model.num_classes, model.num_prototypes
    if len(labels) == 0:
        raise InputValueError(f"{who}: the dataset is empty; expected the training images of all {C} classes.")
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise InputValueError(f"{who}: labels must be in [0, {C}) (the model's classes); got labels in "
                              f"[{int(labels.min())}, {int(labels.max())}].")
    missing = sorted(set(range(C)) - set(labels.tolist()))
    if missing:
        raise InputValueError(
            f"{who}: classes {missing[:10]} have no image in the dataset; expected every class's training images "
            f"(a prototype can only be pushed onto a patch of its own class). Fix: push with the full training set."
        )
    dev = torch.device(device) if device is not None else model.prototypes.device
    was_training = model.training
    model.to(dev).eval()
    proto_cls = model.prototype_classes.to(dev)  # [P]
    best = torch.full((P,), float("inf"), dtype=torch.float64)
    best_img = torch.full((P,), -1, dtype=torch.long)
    best_cell = torch.zeros(P, 2, dtype=torch.long)
    best_patch = model.prototypes.detach()[:, :, 0, 0].clone().cpu()  # [P, d]
    hw: tuple[int, int] | None = None
    try:
        with torch.no_grad():
            for s in range(0, len(labels), batch_size):
                idx = list(range(s, min(s + batch_size, len(labels))))
                images = torch.stack([dataset[i]["image"] for i in idx])
                if images.ndim != 4:
                    raise ShapeError(f"{who}: images must be [3, S, S]; got a batch of shape {tuple(images.shape)}.")
                x = normalize(images, mean, std).to(dev)
                z = model.conv_features(x)  # [B, d, h, w]
                dist = model.latent_distances(z)  # [B, P, h, w]
                B, _, h, w = dist.shape
                hw = (h, w)
                own = labels[idx].to(dev)[:, None] == proto_cls[None, :]  # [B, P]
                dist = torch.where(own[:, :, None, None], dist, torch.full_like(dist, float("inf")))
                flat = dist.permute(1, 0, 2, 3).reshape(P, B * h * w)  # [P, B*h*w], batch-major then row-major
                dmin, arg = flat.min(1)  # first minimum on ties
                better = dmin.double().cpu() < best  # strict: an earlier batch wins ties
                if bool(better.any()):
                    j = torch.nonzero(better).squeeze(1)
                    a = arg.cpu()[j]
                    b, cell = a // (h * w), a % (h * w)
                    y, xx = cell // w, cell % w
                    best[j] = dmin.double().cpu()[j]
                    best_img[j] = torch.tensor(idx)[b]
                    best_cell[j] = torch.stack([y, xx], 1)
                    best_patch[j] = z.cpu()[b, :, y, xx]
        with torch.no_grad():
            model.prototypes.copy_(best_patch.to(model.prototypes.device, model.prototypes.dtype)[:, :, None, None])
    finally:
        model.train(was_training)
    return PushRecord(image_index=best_img, cell=best_cell, distance=best.float(),
                      prototype_classes=model.prototype_classes.cpu().clone(), feature_size=hw or (0, 0))
