"""Baselines on the same model and images, in forms that :func:`phpn_core.evaluation.protoeval.protoeval` consumes.

- :func:`plain_nmf_prototypes`: the decomposition's NMF prototypes before scaling and refinement (step 1 alone).
- :func:`dff_concepts` / :func:`dff_factorize`: Deep Feature Factorization (Collins, Achanta & Suesstrunk,
  "Deep Feature Factorization for Concept Discovery", ECCV 2018) as implemented by pytorch-grad-cam
  (``pytorch_grad_cam.feature_factorization.deep_feature_factorization.dff(activations, n_components)``):
  scikit-learn NMF of the activations ``[D, n*h*w]`` (channels x positions, each channel shifted by its minimum),
  ``init="random"``, ``random_state=0``; the concepts are the columns of ``W`` (plus the shift). Here the
  activations are one class's training images, and a concept's heatmap on a new image is the feature map projected
  on it, ``F_hw . concept`` (what ``head.explain`` computes for a prototype), so the concepts are prototypes
  ``[C, k, D]`` with signs +1. (DFF's own explanations are the NMF coefficients ``H`` of the images it was fit on;
  the projection is the linear read-out that applies to unseen test images.)
- :func:`gradcam_heatmaps` / :func:`gradcam_keypoint_hit`: Grad-CAM (Selvaraju et al., ICCV 2017) on the last conv
  map for a target class, and the ProtoEval keypoint-in-box measure with one map per image (a "where" baseline:
  does the class evidence sit on a part?).

These call scikit-learn (DFF only); it is imported on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
from phpn_core.evaluation.protoeval import class_indices, load_batch, part_coverage

__all__ = [
    "plain_nmf_prototypes", "dff_factorize", "dff_concepts", "DFFResult", "gradcam_heatmaps",
    "gradcam_keypoint_hit", "GradCAMHitResult",
]


def plain_nmf_prototypes(decomposition) -> torch.Tensor:
    """The NMF prototypes of a :class:`~phpn_core.method.decompose.HeadDecomposition`: ``initial`` ``[C, k, D]`` (>= 0).

    Unscaled and unrefined; their maps are non-negative, so they are evaluated with signs +1
    (``protoeval(..., prototypes_override=plain_nmf_prototypes(hd))``). The decomposition must cover all classes
    ``0..C-1`` in order (merge shards first). Returns a copy.
    """
    initial = getattr(decomposition, "initial", None)
    classes = getattr(decomposition, "classes", None)
    if not isinstance(initial, torch.Tensor) or initial.ndim != 3 or classes is None:
        raise TypeError(f"plain_nmf_prototypes: expected a HeadDecomposition (initial [C, k, D], classes); got "
                        f"{type(decomposition).__name__}.")
    if list(classes) != list(range(initial.shape[0])):
        raise InputValueError(
            f"plain_nmf_prototypes: the decomposition covers classes {list(classes)[:5]}...; expected all classes "
            f"0..{initial.shape[0] - 1} in order. Fix: merge the shards into one HeadDecomposition first."
        )
    return initial.detach().clone()


# ================================================================================================ DFF

@dataclass(frozen=True)
class DFFResult:
    """One DFF factorisation: ``concepts`` ``[k, D]`` (>= 0 for non-negative activations), ``explanations``
    ``[n, k, h, w]`` (the NMF coefficients of the fitted images), ``offset`` ``[D]`` (each channel's minimum,
    subtracted before NMF and added back to the concepts), ``rel_error`` (``||A - W H|| / ||A||``) and ``n_iter``."""

    concepts: torch.Tensor
    explanations: torch.Tensor
    offset: torch.Tensor
    rel_error: float
    n_iter: int


def dff_factorize(activations: torch.Tensor, *, k: int, seed: int = 0, init: str = "random", max_iter: int = 200,
                  tol: float = 1e-4) -> DFFResult:
    """Deep Feature Factorization of activations ``[n, D, h, w]`` into k concepts, as pytorch-grad-cam's ``dff``.

    ``A = activations`` as ``[D, n*h*w]`` (positions ordered image, row, column), minus each channel's minimum;
    ``A ~= W H`` by ``sklearn.decomposition.NMF(n_components=k, init=init, random_state=seed, max_iter=max_iter,
    tol=tol)``; concepts ``= (W + offset).T``. The defaults (``init="random"``, ``seed=0``, sklearn's
    ``max_iter=200``, ``tol=1e-4``) are grad-cam's; ``init="nndsvda"`` is a deterministic alternative. sklearn may
    warn that NMF did not converge within ``max_iter`` (as it does inside grad-cam).
    """
    _require_tensor("dff_factorize: activations", activations, 4, "[n, D, h, w]")
    _require_pos_int("k", k, "e.g. k=5")
    n, D, h, w = activations.shape
    if k > min(D, n * h * w):
        raise InputValueError(
            f"dff_factorize: k={k} concepts need k <= min(D={D}, n*h*w={n * h * w}); got k={k}. Use a smaller k."
        )
    if not bool(torch.isfinite(activations).all()):
        raise InputValueError("dff_factorize: activations contain NaN or inf; expected finite feature maps.")
    try:
        from sklearn.decomposition import NMF
    except ImportError as e:  # pragma: no cover - sklearn is a dev dependency
        raise ImportError("dff_factorize needs scikit-learn (pip install 'phpn[dev]').") from e
    A = activations.detach().cpu().numpy().transpose(1, 0, 2, 3).reshape(D, -1)
    offset = A.min(axis=-1)
    A = A - offset[:, None]
    model = NMF(n_components=k, init=init, random_state=seed, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        # grad-cam's recipe stops at 200 iterations, converged or not: the baseline is its result as is (n_iter is
        # returned), so sklearn's warning about it is noise in a run's log.
        warnings.filterwarnings("ignore", message="Maximum number of iterations", category=UserWarning)
        W = model.fit_transform(A)  # [D, k]
    H = model.components_  # [k, n*h*w]
    rel = float(np.linalg.norm(A - W @ H) / max(np.linalg.norm(A), 1e-30))
    concepts = torch.from_numpy(np.ascontiguousarray((W + offset[:, None]).T)).to(activations.dtype)
    expl = torch.from_numpy(np.ascontiguousarray(H.reshape(k, n, h, w).transpose(1, 0, 2, 3))).to(activations.dtype)
    return DFFResult(concepts=concepts, explanations=expl, offset=torch.from_numpy(offset).to(activations.dtype),
                     rel_error=rel, n_iter=int(model.n_iter_))


def dff_concepts(
    features_module,
    dataset,
    *,
    k: int,
    classes: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    mean=None,
    std=None,
    seed: int = 0,
    init: str = "random",
    max_iter: int = 200,
    tol: float = 1e-4,
) -> torch.Tensor:
    """DFF concepts per class, usable as prototypes: ``[C, k, D]`` (C = ``len(dataset.classes)``).

    For each class c, the feature maps of its images in ``dataset`` (pass the TRAIN set) are factorised by
    :func:`dff_factorize` (one NMF per class, over all its images' positions). Rows of classes not in ``classes``
    are zero: evaluate only the classes that were factorised.

    Args:
        features_module: normalised images ``[B, 3, S, S]`` -> ``[B, D, h, w]``, in eval mode.
        dataset: training set following :mod:`phpn_core.data.base`'s contract (``classes``, ``labels``).
        k: concepts per class.
        classes: classes to factorise (default all).
        device, batch_size, mean, std: feature extraction (normalisation defaults to the dataset's).
        seed, init, max_iter, tol: the NMF (see :func:`dff_factorize`).

    Returns:
        float32 ``[C, k, D]`` on the CPU: the directions DFF factorised (``concepts - offset``; equal to grad-cam's
        concepts for non-negative activations); signs +1 (``protoeval(..., prototypes_override=...)``).
    """
    who = "dff_concepts"
    _check_eval_mode(features_module, who)
    _require_pos_int("k", k, "e.g. k=5")
    _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")
    n_classes = len(getattr(dataset, "classes", []) or [])
    if n_classes == 0:
        raise InputValueError(f"{who}: the dataset has no 'classes' attribute; expected a dataset following "
                              f"phpn_core.data.base's contract.")
    dev = _module_device(features_module, device)
    mean, std = _resolve_norm(mean, std, dataset, who)
    classes, by_class = class_indices(dataset, classes, n_classes, who)
    out = None
    with torch.no_grad():
        for c in classes:
            idx = by_class[c]
            maps = []
            for s in range(0, len(idx), batch_size):
                images = torch.stack([dataset[i]["image"] for i in idx[s : s + batch_size]])
                maps.append(features_module(normalize(images, mean, std).to(dev)).float().cpu())
            fm = torch.cat(maps)
            res = dff_factorize(fm, k=k, seed=seed, init=init, max_iter=max_iter, tol=tol)
            if out is None:
                out = torch.zeros(n_classes, k, fm.shape[1], dtype=torch.float32)
            # The factorised directions W (concepts minus the channel minima): their maps are the projections of
            # the shifted activations DFF factorised, up to a constant per map, so they peak where DFF's own
            # coefficients do. grad-cam's concepts (W + offset) give the same maps when every channel's minimum
            # is 0 (post-ReLU); on signed maps offset . F would dominate and pin every peak to one place.
            out[c] = res.concepts - res.offset.unsqueeze(0)
    return out


# ================================================================================================ Grad-CAM

def gradcam_heatmaps(model_features, weight: torch.Tensor, bias: torch.Tensor | None, images_normalised: torch.Tensor,
                     target_classes, *, batch_size: int | None = None) -> torch.Tensor:
    """Grad-CAM on the last conv map ``F`` for each image's target class.

    ``logit_c = mean_hw(F) @ weight[c] + bias[c]``; channel weights ``a_d = mean_hw(d logit_c / d F_d)``;
    ``cam = relu(sum_d a_d F_d)``. For a GAP + linear head ``a = weight[c] / (h*w)``, so the cam is the class's
    (rectified) full-head heatmap over ``h*w``; the gradient is taken anyway, so any logit function would do.

    Args:
        model_features: normalised images ``[N, 3, S, S]`` -> ``[N, D, h, w]`` (in eval mode).
        weight: ``[C, D]``; bias: ``[C]`` or None.
        images_normalised: ``[N, 3, S, S]`` normalised images.
        target_classes: int, or ``[N]`` ints.
        batch_size: images per forward pass (default all at once).

    Returns:
        ``[N, h, w]`` non-negative cams (unnormalised, on the features' device).
    """
    who = "gradcam_heatmaps"
    _check_eval_mode(model_features, who)
    _require_tensor(f"{who}: images_normalised", images_normalised, 4, "[N, 3, S, S]")
    _require_tensor(f"{who}: weight", weight, 2, "[C, D]")
    N = images_normalised.shape[0]
    C, D = weight.shape
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C,)):
        raise ShapeError(f"{who}: bias must have shape [C={C}] or be None; got {_desc(bias)}.")
    t = torch.as_tensor(target_classes, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(N)
    if tuple(t.shape) != (N,) or bool(((t < 0) | (t >= C)).any()):
        raise InputValueError(f"{who}: target_classes must be an int or [N={N}] ints in [0, {C}); got {_desc(t)}.")
    bs = N if batch_size is None else _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")
    cams = []
    for s in range(0, max(N, 1), max(bs, 1)):
        x = images_normalised[s : s + bs]
        if x.shape[0] == 0:
            break
        with torch.no_grad():
            fmap = model_features(x)
        if fmap.ndim != 4 or fmap.shape[1] != D:
            raise ShapeError(f"{who}: model_features must give [B, D={D}, h, w]; got {_desc(fmap)}.")
        fmap = fmap.detach().requires_grad_(True)
        Wd = weight.detach().to(fmap.device, fmap.dtype)
        bd = (bias.detach() if bias is not None else torch.zeros(C)).to(fmap.device, fmap.dtype)
        with torch.enable_grad():
            logits = fmap.mean((2, 3)) @ Wd.T + bd
            sel = logits.gather(1, t[s : s + bs].to(fmap.device)[:, None]).sum()
            (grads,) = torch.autograd.grad(sel, fmap)
        a = grads.mean((2, 3))  # [B, D]
        cams.append(torch.relu((a[:, :, None, None] * fmap.detach()).sum(1)))
    return torch.cat(cams) if cams else torch.zeros(0, 0, 0)


@dataclass(frozen=True)
class GradCAMHitResult:
    """Grad-CAM keypoint-in-box measure. ``hit_rate``: fraction of images whose box covers some visible part;
    ``per_part_hit_rate`` float64 ``[P]``: among images where part p is visible, the fraction where it is covered
    (0 where never visible); ``visible_count`` ``[P]``; ``covered`` bool ``[N, P]``; ``visible`` bool ``[N, P]``;
    ``labels`` ``[N]`` (the target classes); ``image_indices``; ``n_images``."""

    hit_rate: float
    per_part_hit_rate: torch.Tensor
    visible_count: torch.Tensor
    covered: torch.Tensor
    visible: torch.Tensor
    labels: torch.Tensor
    image_indices: list[int]
    n_images: int


def gradcam_keypoint_hit(
    model_features,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dataset,
    *,
    classes: Sequence[int] | None = None,
    mean=None,
    std=None,
    box_half_size: float = 36,
    box_reference_size: int | None = 224,
    upsample: str = "bilinear",
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> GradCAMHitResult:
    """The ProtoEval box (:func:`~phpn_core.evaluation.protoeval.part_coverage` with k = 1) around each image's Grad-CAM peak
    for its own label, on the images of ``classes`` (default all) of a test set with keypoints.

    Returns:
        :class:`GradCAMHitResult`.
    """
    who = "gradcam_keypoint_hit"
    _check_eval_mode(model_features, who)
    _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")
    _require_tensor(f"{who}: weight", weight, 2, "[C, D]")
    dev = _module_device(model_features, device)
    mean, std = _resolve_norm(mean, std, dataset, who)
    classes, by_class = class_indices(dataset, classes, weight.shape[0], who)
    covs, vis, labs, order = [], [], [], []
    for c in classes:
        idx = by_class[c]
        for s in range(0, len(idx), batch_size):
            bidx = idx[s : s + batch_size]
            images, kps = load_batch(dataset, bidx, who)
            x = normalize(images, mean, std).to(dev)
            cams = gradcam_heatmaps(model_features, weight, bias, x, torch.full((len(bidx),), c, dtype=torch.long))
            cov = part_coverage(cams[:, None], kps.to(cams.device), image_size=tuple(images.shape[-2:]),
                                box_half_size=box_half_size, box_reference_size=box_reference_size, upsample=upsample)
            covs.append(cov[:, 0].cpu())
            vis.append(kps[..., 2] > 0.5)
            labs.append(torch.full((len(bidx),), c, dtype=torch.long))
            order.extend(bidx)
    covered, visible = torch.cat(covs), torch.cat(vis)
    vcount = visible.sum(0)
    per_part = covered.sum(0).double() / vcount.clamp_min(1).double()
    return GradCAMHitResult(
        hit_rate=float(covered.any(-1).double().mean()), per_part_hit_rate=per_part, visible_count=vcount,
        covered=covered, visible=visible, labels=torch.cat(labs), image_indices=order, n_images=len(order),
    )
