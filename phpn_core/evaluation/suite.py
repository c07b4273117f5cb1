"""The evaluation a run reports: phpn's prototypes beside the baselines, on the same model and images.

Composition of :mod:`phpn_core.evaluation` (ProtoEval, faithfulness), :mod:`phpn_core.evaluation.keypoint_free`
(deletion/insertion AUC, box stability, redundancy) and :mod:`phpn_core.evaluation.baselines`; returns a small
JSON-ready summary (the numbers in metrics.json) and the per-prototype details (written next to it).
"""

from __future__ import annotations

import time

import torch

from phpn_core.evaluation.baselines import dff_concepts, gradcam_keypoint_hit
from phpn_core.evaluation.keypoint_free import keypoint_free, keypoint_free_gradcam
from phpn_core.evaluation.faithfulness import (
    completeness_error,
    linearity_check,
    sensitivity_check,
    symmetry_check,
)
from phpn_core.evaluation.protoeval import protoeval
from phpn_core.method.head import PartPrototypeHead

__all__ = ["evaluate_all", "faithfulness"]


def faithfulness(head: PartPrototypeHead, fmap: torch.Tensor) -> dict:
    """The four axioms as measured errors on ``fmap [B, D, H, W]`` (each 0 up to float rounding when it holds)."""
    ex = head.explain(fmap)
    other = PartPrototypeHead(torch.flip(head.prototypes, dims=(0,)), torch.flip(head.bias, dims=(0,)))
    # Symmetry premise: two identical channels with equal prototype weights on them.
    f2 = fmap.clone()
    f2[:, 1] = f2[:, 0]
    p2 = head.prototypes.clone()
    p2[:, :, 1] = p2[:, :, 0]
    sym_head = PartPrototypeHead(p2, head.bias, signs=head.signs)
    return {
        "completeness_error": completeness_error(ex),
        "sensitivity_error": sensitivity_check(head, fmap),
        "linearity_error": linearity_check(head, other, fmap, 0.7, -1.3),
        "symmetry_error": symmetry_check(sym_head, f2, 0, 1),
    }


def _pe_summary(res) -> dict:
    return {"consistency": float(res.consistency), "stability": float(res.stability)}


def evaluate_all(features, head: PartPrototypeHead, dataset, *, initial: torch.Tensor | None = None,
                 train_dataset=None, box_half_size: float = 36, threshold: float = 0.8, noise_std: float = 0.2,
                 noise_clip: float = 0.25, seed: int = 0, baselines: bool = True, device=None,
                 batch_size: int = 64, keypoint_free_metrics: bool = True, keypoint_free_images: int | None = 4,
                 keypoint_free_steps: int = 16) -> dict:
    """ProtoEval and the keypoint-free metrics for phpn (and, with ``baselines``, plain NMF prototypes, DFF
    concepts and Grad-CAM), plus the faithfulness axioms. ``initial``: the plain NMF prototypes ``[C, k, D]``;
    ``train_dataset``: for DFF.

    Keypoint-free metrics (:mod:`~phpn_core.evaluation.keypoint_free`; off with ``keypoint_free_metrics=False``):
    ``insertion_auc``, ``deletion_auc`` (each prototype's oriented map against its own contribution, over the first
    ``keypoint_free_images`` test images of each class, ``keypoint_free_steps`` steps; their cost is
    ``2 + 2 (k + 1) (steps - 1)`` forward passes per image and method), ``insertion_auc_class``/``deletion_auc_class``
    (the summed map against the class logit), ``box_stability`` and ``redundancy``/``duplicate_rate`` (all test
    images), for phpn at the top level and under each baseline's key; Grad-CAM gets the AUCs and box stability
    (redundancy needs two maps). ProtoEval runs only when the test set has part keypoints (``part_names``);
    otherwise ``consistency``/``stability`` are None and the keypoint-free metrics are still computed.

    Returns ``{"summary": {...}, "details": {...}}``; ``summary`` has ``consistency``, ``stability``,
    ``baselines`` and ``faithfulness`` (and the keypoint-free keys above).
    """
    t0 = time.perf_counter()
    common = dict(box_half_size=box_half_size, threshold=threshold, noise_std=noise_std, noise_clip=noise_clip,
                  seed=seed, device=device, batch_size=batch_size)
    kf_common = dict(box_half_size=box_half_size, noise_std=noise_std, noise_clip=noise_clip, seed=seed,
                     device=device, batch_size=batch_size, max_images=keypoint_free_images, steps=keypoint_free_steps)
    has_parts = bool(getattr(dataset, "part_names", None))
    summary: dict = {"consistency": None, "stability": None}
    details: dict = {}

    def run(name: str, out: dict, prototypes=None) -> None:
        if has_parts:
            pe = protoeval(features, head, dataset, prototypes_override=prototypes, **common)
            out.update(_pe_summary(pe))
            details[name] = pe.to_dict()
        if keypoint_free_metrics:
            kf = keypoint_free(features, head, dataset, prototypes_override=prototypes, **kf_common)
            out.update(kf.summary())
            details.setdefault(name, {})["keypoint_free"] = kf.to_dict()

    run("phpn", summary)
    if baselines:
        base: dict = {}
        if initial is not None:
            run("plain_nmf", base.setdefault("plain_nmf", {}), initial)
        if train_dataset is not None:
            concepts = dff_concepts(features, train_dataset, k=head.k, device=device, batch_size=batch_size,
                                    seed=seed)
            run("dff", base.setdefault("dff", {}), concepts)
        gcam: dict = {}
        if has_parts:
            gc = gradcam_keypoint_hit(features, head.weight, head.bias, dataset, box_half_size=box_half_size,
                                      device=device, batch_size=batch_size)
            gcam["keypoint_hit_rate"] = float(gc.hit_rate)
        if keypoint_free_metrics:
            kf = keypoint_free_gradcam(features, head.weight, head.bias, dataset, **kf_common)
            gcam.update({key: v for key, v in kf.summary().items() if key not in ("redundancy", "duplicate_rate")})
            details["gradcam"] = {"keypoint_free": kf.to_dict()}
        base["gradcam"] = gcam
        summary["baselines"] = base
    # Faithfulness on a few test images' feature maps.
    idx = list(range(min(16, len(dataset))))
    x = torch.stack([dataset[i]["image"] for i in idx])
    from phpn_core.data.base import normalize

    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch.inference_mode():
        fmap = features.to(dev)(normalize(x, dataset.mean, dataset.std).to(dev)).cpu()
    summary["faithfulness"] = faithfulness(head.cpu(), fmap.clone())
    summary["evaluation_seconds"] = round(time.perf_counter() - t0, 3)
    return {"summary": summary, "details": details}
