"""ProtoPNet's "where" for evaluation: each class's prototype similarity maps, and ProtoEval through the one shared
loop (:func:`phpn_core.evaluation.protoeval.protoeval_maps`, the same code that scores phpn's prototypes).
"""

from __future__ import annotations

import torch

from phpn_core.evaluation.protoeval import ProtoEvalResult, protoeval_maps
from phpn_core.protopnet.model import ProtoPNet

__all__ = ["own_class_maps", "protopnet_protoeval", "protopnet_accuracy"]


def own_class_maps(model: ProtoPNet, x: torch.Tensor, c: int) -> torch.Tensor:
    """Similarity maps of class ``c``'s m prototypes: ``x [B, 3, S, S]`` (normalised) -> ``[B, m, h, w]``.

    ``log((dist + 1) / (dist + 1e-4))`` per cell, high where the prototype's patch is (what ProtoEval locates; the
    EvalProtoPNet reference scores ProtoPNet's activation maps the same way). Run the model in eval mode.
    """
    if not isinstance(model, ProtoPNet):
        raise TypeError(f"own_class_maps: model must be a ProtoPNet; got {type(model).__name__}.")
    idx = model.prototypes_of_class(c).to(model.prototypes.device)
    return model.distance_to_similarity(model.latent_distances(model.conv_features(x), idx))


def protopnet_protoeval(model: ProtoPNet, dataset, *, device=None, **options) -> ProtoEvalResult:
    """ProtoEval consistency and stability of ``model``'s prototypes on ``dataset`` (a test set with keypoints).

    ``protoeval_maps(lambda x, c: own_class_maps(model, x, c), dataset, n_classes=C, ...)``; ``options`` are
    :func:`~phpn_core.evaluation.protoeval.protoeval_maps`'s (box, threshold, noise, ``classes``, ``batch_size``).
    The model is evaluated in eval mode (its mode is restored after) on ``device`` (default: where it is).
    """
    if not isinstance(model, ProtoPNet):
        raise TypeError(f"protopnet_protoeval: model must be a ProtoPNet; got {type(model).__name__}.")
    dev = torch.device(device) if device is not None else model.prototypes.device
    was_training = model.training
    model.to(dev).eval()
    try:
        res = protoeval_maps(lambda x, c: own_class_maps(model, x, c), dataset, n_classes=model.num_classes,
                             device=dev, **options)
    finally:
        model.train(was_training)
    res.settings["prototypes"] = "protopnet"
    return res


@torch.no_grad()
def protopnet_accuracy(model: ProtoPNet, dataset, *, batch_size: int = 128, device=None, mean=None, std=None
                       ) -> float:
    """Top-1 accuracy in ``[0, 1]`` on ``dataset`` (normalised with ``mean``/``std``, default the dataset's), in
    eval mode (restored after)."""
    from phpn_core.data.base import normalize
    from phpn_core.protopnet.push import dataset_labels, dataset_norm

    mean, std = dataset_norm(dataset, mean, std, "protopnet_accuracy")
    dev = torch.device(device) if device is not None else model.prototypes.device
    labels = torch.tensor(dataset_labels(dataset))
    was_training = model.training
    model.to(dev).eval()
    correct = 0
    try:
        for s in range(0, len(labels), batch_size):
            x = torch.stack([dataset[i]["image"] for i in range(s, min(s + batch_size, len(labels)))])
            correct += int((model(normalize(x, mean, std).to(dev)).argmax(1).cpu() == labels[s:s + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(labels))
