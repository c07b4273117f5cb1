"""Prototype quality without keypoints: deletion/insertion AUC, box stability, redundancy.

ProtoEval (:mod:`~phpn_core.evaluation.protoeval`) needs part keypoints; these three need only images, so they apply
to any model and data (ImageNet photos included), and to every method that gives maps on the same images: phpn's
oriented prototype maps, plain NMF prototypes, DFF concepts (``prototypes_override``) and Grad-CAM (one map).

**Deletion / insertion AUC** (Petsiuk et al., "RISE", BMVC 2018), :func:`deletion_insertion`:

- each map ``[h, w]`` is upsampled to the image (``upsample``, bilinear by default, as ProtoEval) and its pixels are
  ranked, most salient first (ties: row-major order, so the ranking is deterministic);
- perturbation is in image space, on the *normalised* input (blurring commutes with the per-channel affine
  normalisation, so this equals perturbing the [0, 1] image): the *baseline* image is a Gaussian blur of the image
  (``baseline="blur"``, sigma ``blur_sigma`` px at ``blur_reference_size`` px, scaled with each side, replicate
  padding, kernel radius ``ceil(3 sigma)``), or each image's per-channel mean (``"mean"``), or 0, the dataset mean
  (``"zero"``). The same baseline serves both curves;
- ``steps`` (default 16) equal steps ``t = 0..T``: at step t the ``round(t * H * W / T)`` most salient pixels are
  replaced by the baseline's (deletion) or revealed from the image onto the baseline (insertion);
- the score of a prototype's map is that prototype's own contribution ``mean_hw(F(x)_hw . p_i)`` (for phpn a part of
  the logit; for plain NMF and DFF the mean of the concept's own map, the quantity its map localises); the score of
  the summed map ``sum_i oriented_i`` and of Grad-CAM's map is the class logit ``logit_c(x)``. Scores are
  *normalised* per (image, map) by their clean and baseline values, ``(s_t - s_base) / (s_clean - s_base)``, and
  clipped to ``[0, 1]``: every deletion curve runs from 1 to 0 and every insertion curve from 0 to 1 whatever the
  score's scale or sign (a prototype of negative evidence included), so AUCs compare across prototypes, methods and
  models. AUC: trapezoid rule over ``t / T`` in ``[0, 1]``. Insertion: higher is better; deletion: lower is better.
  A random ranking gives about 0.5 on both.
- pairs whose clean and baseline scores are equal (``|s_clean - s_base| <= 1e-5 (|s_clean| + |s_base|) + 1e-12``)
  have no curve: their AUCs are NaN, ``valid`` is False, and means skip them (``n_excluded`` counts them).

Cost: ``2 + 2 M (T - 1)`` forward passes per image for M maps (k prototypes + the summed map).

**Box stability**, :func:`box_stability`: ProtoEval's box (72 px at 224 px, :func:`box_half_size_px`) around each
map's upsampled argmax (:func:`peak_locations`), on the clean input and under ProtoEval's noise (the same
``clip(N(0, noise_std), +-noise_clip)`` on the normalised input, image i seeded by ``seed * 1_000_003 + i``); a (prototype,
image) pair is stable when the two boxes' IoU is ``>= iou_threshold`` (0.5). Score = fraction of stable pairs.

**Redundancy**, :func:`map_redundancy`: per class, each prototype's oriented maps over the class's images are centred
per image (each map minus its spatial mean: maps of non-negative features share a positive offset that would make
any two maps look alike; ``center=False`` gives the plain cosine) and concatenated into one vector; the class's
redundancy is the largest cosine between two prototypes' vectors (in [-1, 1]; a constant map has cosine 0 with
everything). ``redundancy`` = mean of that maximum over classes; ``duplicate_rate`` = share of classes whose maximum is
``> duplicate_threshold`` (0.9). Two identical prototypes give 1.0 and count as a duplicate.

:func:`keypoint_free` runs all three on a head's prototypes (or ``prototypes_override``), :func:`keypoint_free_gradcam`
on Grad-CAM, and :func:`keypoint_free_maps` on any model given by its maps and scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.evaluation._checks import (
    _box_bounds,
    _check_eval_mode,
    check_active,
    check_active_k,
    _desc,
    _head_on,
    _module_device,
    _noise_like,
    _require_float,
    _require_pos_int,
    _require_tensor,
    _resolve_norm,
)
from phpn_core.evaluation.baselines import gradcam_heatmaps
from phpn_core.evaluation.protoeval import UPSAMPLE_MODES, box_half_size_px, class_indices, peak_locations
from phpn_core.method.head import PartPrototypeHead
from phpn_core.method.redundancy import map_cosines, max_cosine

__all__ = [
    "BASELINES",
    "DeletionInsertionResult",
    "KeypointFreeResult",
    "box_stability",
    "deletion_insertion",
    "keypoint_free",
    "keypoint_free_gradcam",
    "keypoint_free_maps",
    "map_redundancy",
]

BASELINES = ("blur", "mean", "zero")


# ============================================================================================ deletion / insertion

@dataclass(frozen=True)
class DeletionInsertionResult:
    """Deletion and insertion curves of ``M`` maps on each of ``N`` images (``T = steps``).

    ``deletion``/``insertion``: float64 ``[N, M, T + 1]`` normalised scores in [0, 1] (NaN rows where not valid);
    ``deletion_auc``/``insertion_auc``: float64 ``[N, M]`` (NaN where not valid); ``clean``/``base``: float64
    ``[N, M]`` the raw scores on the clean and the baseline image; ``valid``: bool ``[N, M]``."""

    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    clean: torch.Tensor
    base: torch.Tensor
    valid: torch.Tensor


def _gaussian_blur(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x [B, C, H, W]`` (replicate padding, radius ``ceil(3 sigma)``)."""
    out = x
    for dim, sigma in ((2, sigma_y), (3, sigma_x)):
        if sigma <= 0:
            continue
        r = max(1, int(math.ceil(3 * sigma)))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        C = out.shape[1]
        if dim == 2:
            w, pad = k.view(1, 1, -1, 1).expand(C, 1, -1, 1), (0, 0, r, r)
        else:
            w, pad = k.view(1, 1, 1, -1).expand(C, 1, 1, -1), (r, r, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="replicate"), w, groups=C)
    return out


def _baseline_images(x: torch.Tensor, baseline: str, sigma: float, reference: int | None) -> torch.Tensor:
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    H, W = x.shape[-2:]
    sy, sx = (sigma, sigma) if reference is None else (sigma * H / reference, sigma * W / reference)
    return _gaussian_blur(x, sy, sx)


def _ranks(saliency: torch.Tensor, size: tuple[int, int], upsample: str) -> torch.Tensor:
    """``saliency [N, M, h, w]`` -> long ``[N, M, H*W]``: each pixel's rank, 0 = most salient (ties row-major)."""
    N, M, h, w = saliency.shape
    m = saliency.detach().reshape(N * M, 1, h, w).double()
    if (h, w) != tuple(size):
        kw = {} if upsample == "nearest" else {"align_corners": False}
        m = F.interpolate(m, size=size, mode=upsample, **kw)
    flat = m.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.reshape(N, M, -1)


def _check_perturbation(who, *, steps, baseline, blur_sigma, blur_reference_size, upsample, batch_size):
    _require_pos_int("steps", steps, "e.g. steps=16 (RISE-style curves use 16-32 steps).")
    if steps < 2:
        raise InputValueError(f"{who}: steps must be >= 2 (a curve needs an inner point); got {steps}.")
    if baseline not in BASELINES:
        raise InputValueError(f"{who}: baseline must be one of {BASELINES}; got {baseline!r}.")
    _require_float("blur_sigma", blur_sigma, hint="e.g. blur_sigma=10 (pixels at blur_reference_size).")
    if blur_reference_size is not None:
        _require_pos_int("blur_reference_size", blur_reference_size, "e.g. 224, or None for no scaling.")
    if upsample not in UPSAMPLE_MODES:
        raise InputValueError(f"{who}: upsample must be one of {UPSAMPLE_MODES}; got {upsample!r}.")
    _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")


def deletion_insertion(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    *,
    steps: int = 16,
    baseline: str = "blur",
    blur_sigma: float = 10.0,
    blur_reference_size: int | None = 224,
    upsample: str = "bilinear",
    batch_size: int = 64,
) -> DeletionInsertionResult:
    """Deletion and insertion curves and AUCs of ``M`` saliency maps per image (see the module docstring).

    Args:
        score_fn: normalised images ``[B, 3, H, W]`` -> scores ``[B, M]``; column m is the score map m explains
            (a prototype's contribution, or the class logit). Called under ``torch.no_grad()``.
        images: normalised images ``[N, 3, H, W]`` (not modified).
        saliency: maps ``[N, M, h, w]`` (not modified), higher = more salient; upsampled to ``H x W``.
        steps: T, the number of equal perturbation steps (>= 2).
        baseline: ``"blur"``, ``"mean"`` or ``"zero"`` (the image pixels are replaced by / revealed onto).
        blur_sigma, blur_reference_size: the blur's sigma in px at the reference size, scaled with each side
            (``None``: px on every size).
        upsample: ``"bilinear"``/``"bicubic"``/``"nearest"``.
        batch_size: perturbed images per ``score_fn`` call.

    Returns:
        :class:`DeletionInsertionResult` with ``[N, M, T + 1]`` curves and ``[N, M]`` AUCs.
    """
    who = "deletion_insertion"
    if not callable(score_fn):
        raise TypeError(f"{who}: score_fn must be callable (x [B, 3, H, W]) -> [B, M]; got {score_fn!r:.60}.")
    _require_tensor(f"{who}: images", images, 4, "[N, 3, H, W]")
    _require_tensor(f"{who}: saliency", saliency, 4, "[N, M, h, w]")
    _check_perturbation(who, steps=steps, baseline=baseline, blur_sigma=blur_sigma,
                        blur_reference_size=blur_reference_size, upsample=upsample, batch_size=batch_size)
    N, _, H, W = images.shape
    if saliency.shape[0] != N or saliency.shape[1] < 1:
        raise ShapeError(f"{who}: saliency must have shape [N={N}, M>=1, h, w] (one or more maps per image); got "
                         f"{_desc(saliency)}.")
    if not images.is_floating_point() or not saliency.is_floating_point():
        raise TypeError(f"{who}: images and saliency must be float; got {images.dtype} and {saliency.dtype}.")
    if not bool(torch.isfinite(saliency).all()) or not bool(torch.isfinite(images).all()):
        raise InputValueError(f"{who}: images or saliency contain NaN or inf; expected finite values.")
    M, T = saliency.shape[1], steps

    def scores(x: torch.Tensor) -> torch.Tensor:
        s = score_fn(x)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (x.shape[0], M):
            raise ShapeError(f"{who}: score_fn must return [B={x.shape[0]}, M={M}] (one score per map); got "
                             f"{_desc(s)}.")
        return s.detach().double().cpu()

    with torch.no_grad():
        x = images.detach()
        base = _baseline_images(x, baseline, float(blur_sigma), blur_reference_size)
        clean = torch.cat([scores(x[s : s + batch_size]) for s in range(0, N, batch_size)])  # [N, M]
        floor = torch.cat([scores(base[s : s + batch_size]) for s in range(0, N, batch_size)])
        ranks = _ranks(saliency, (H, W), upsample).to(x.device)  # [N, M, HW]
        counts = [int(math.floor(t * H * W / T + 0.5)) for t in range(1, T)]
        # every (curve, image, map, inner step); curve 0 = deletion, 1 = insertion
        jobs = [(d, n, m, j) for d in (0, 1) for n in range(N) for m in range(M) for j in range(T - 1)]
        raw = torch.empty(2, N, M, T - 1, dtype=torch.float64)
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s : s + batch_size]
            d = torch.tensor([c[0] for c in chunk], device=x.device)
            n = torch.tensor([c[1] for c in chunk], device=x.device)
            m = torch.tensor([c[2] for c in chunk], device=x.device)
            cnt = torch.tensor([counts[c[3]] for c in chunk], device=x.device)
            top = (ranks[n, m] < cnt[:, None]).view(-1, 1, H, W)  # the most salient pixels
            take_base = torch.where(d.view(-1, 1, 1, 1) == 0, top, ~top)
            xp = torch.where(take_base, base[n], x[n])
            sc = scores(xp)[torch.arange(len(chunk)), m.cpu()]
            j = torch.tensor([c[3] for c in chunk])
            raw[d.cpu(), n.cpu(), m.cpu(), j] = sc
    gap = clean - floor
    valid = gap.abs() > 1e-5 * (clean.abs() + floor.abs()) + 1e-12
    safe = torch.where(valid, gap, torch.ones_like(gap))
    inner = ((raw - floor[None, ..., None]) / safe[None, ..., None]).clamp(0, 1)
    ones, zeros = torch.ones(N, M, 1, dtype=torch.float64), torch.zeros(N, M, 1, dtype=torch.float64)
    dele = torch.cat([ones, inner[0], zeros], -1)
    ins = torch.cat([zeros, inner[1], ones], -1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    dele = torch.where(valid[..., None], dele, nan)
    ins = torch.where(valid[..., None], ins, nan)

    def auc(c: torch.Tensor) -> torch.Tensor:
        return (c.sum(-1) - 0.5 * (c[..., 0] + c[..., -1])) / T

    return DeletionInsertionResult(deletion=dele, insertion=ins, deletion_auc=auc(dele), insertion_auc=auc(ins),
                                   clean=clean, base=floor, valid=valid)


# ============================================================================================ box stability

def box_stability(maps_clean: torch.Tensor, maps_noisy: torch.Tensor, *, image_size, box_half_size: float = 36,
                  box_reference_size: int | None = 224, upsample: str = "bilinear", iou_threshold: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each (image, prototype) argmax box survives noise.

    Args:
        maps_clean, maps_noisy: ``[N, k, h, w]`` maps on the clean and the noisy input (not modified).
        image_size: S or (H, W) of the images; box_half_size, box_reference_size: ProtoEval's box
            (:func:`~phpn_core.evaluation.protoeval.box_half_size_px`); upsample: see
            :func:`~phpn_core.evaluation.protoeval.peak_locations`.
        iou_threshold: a pair is stable when IoU >= this (default 0.5).

    Returns:
        ``(stable, iou)``: bool ``[N, k]`` and float64 ``[N, k]`` in [0, 1] (on the CPU). Boxes are
        ``[row - hy, row + hy] x [col - hx, col + hx]`` clipped to the image, areas in continuous pixel units.
    """
    _require_tensor("box_stability: maps_clean", maps_clean, 4, "[N, k, h, w]")
    _require_tensor("box_stability: maps_noisy", maps_noisy, 4, "[N, k, h, w]")
    if maps_clean.shape != maps_noisy.shape:
        raise ShapeError(f"box_stability: maps_clean and maps_noisy must have the same shape [N, k, h, w]; got "
                         f"{tuple(maps_clean.shape)} and {tuple(maps_noisy.shape)}.")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0 < iou_threshold <= 1:
        raise InputValueError(f"box_stability: iou_threshold must be in (0, 1]; got {iou_threshold!r} (default 0.5).")
    hy, hx = box_half_size_px(image_size, box_half_size=box_half_size, box_reference_size=box_reference_size)
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    a = _box_bounds(peak_locations(maps_clean, image_size=image_size, upsample=upsample), H, W, hy, hx)
    b = _box_bounds(peak_locations(maps_noisy, image_size=image_size, upsample=upsample), H, W, hy, hx)
    ih = (torch.minimum(a[1], b[1]) - torch.maximum(a[0], b[0])).clamp_min(0)
    iw = (torch.minimum(a[3], b[3]) - torch.maximum(a[2], b[2])).clamp_min(0)
    inter = ih * iw
    union = (a[1] - a[0]) * (a[3] - a[2]) + (b[1] - b[0]) * (b[3] - b[2]) - inter
    same = torch.stack([t[0] == u[0] for t, u in zip(a, b)]).all(0)
    iou = torch.where(union > 0, inter / union.clamp_min(1e-30), same.double())[..., 0].cpu()
    return iou >= iou_threshold, iou


# ============================================================================================ redundancy

def map_redundancy(maps: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Cosine between every two prototypes' maps over one class's images.

    Args:
        maps: ``[N, k, h, w]`` one class's oriented maps on its N images (not modified).
        center: subtract each map's spatial mean per image first (default; see the module docstring).

    Returns:
        float64 ``[k, k]`` cosine matrix (diagonal 1 for non-constant maps; 0 where a map is constant).
        The class's redundancy is its largest off-diagonal value.
    """
    _require_tensor("map_redundancy: maps", maps, 4, "[N, k, h, w]")
    N, k = maps.shape[:2]
    if N == 0:
        raise InputValueError("map_redundancy: no images (N=0); expected at least one image of the class.")
    return map_cosines(maps.flatten(2).transpose(1, 2).unsqueeze(0), center=center)[0].cpu()


# ============================================================================================ the evaluation loop

@dataclass(frozen=True)
class KeypointFreeResult:
    """Keypoint-free metrics of one method over ``C' = len(classes)`` classes of k maps.

    ``insertion_auc``/``deletion_auc``: mean over valid (class, image, prototype) curves of each prototype's map
    against its own score; ``insertion_auc_class``/``deletion_auc_class``: the summed map (or, with one map, the
    map) against the class logit (None when there is no summed map); ``box_stability``: fraction in [0, 1] of
    (class, image, prototype) pairs whose box keeps IoU >= the threshold; ``redundancy``/``duplicate_rate``: see the
    module docstring (None when k = 1). ``per_class``: one dict per class (``class_index``, the same numbers, and
    ``cosine`` ``[k][k]``); ``n_excluded``: curves without a score gap; ``settings``: the protocol's options."""

    insertion_auc: float
    deletion_auc: float
    insertion_auc_class: float | None
    deletion_auc_class: float | None
    box_stability: float
    redundancy: float | None
    duplicate_rate: float | None
    classes: list[int]
    per_class: list[dict]
    n_excluded: int
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON-ready numbers for metrics.json."""
        return {"insertion_auc": self.insertion_auc, "deletion_auc": self.deletion_auc,
                "insertion_auc_class": self.insertion_auc_class, "deletion_auc_class": self.deletion_auc_class,
                "box_stability": self.box_stability, "redundancy": self.redundancy,
                "duplicate_rate": self.duplicate_rate}

    def to_dict(self) -> dict:
        """A JSON-serialisable summary with per-class values and settings (no per-image data)."""
        return {**self.summary(), "classes": list(self.classes), "per_class": [dict(r) for r in self.per_class],
                "n_excluded": self.n_excluded, "settings": dict(self.settings)}


def _nanmean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")


def _load_images(dataset, indices: Sequence[int], who: str) -> torch.Tensor:
    images = [dataset[i]["image"] for i in indices]
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ShapeError(f"{who}: images of one batch must share one shape [3, H, W]; got {sorted(shapes)}.")
    return torch.stack(images)


def keypoint_free_maps(
    maps_fn: Callable[[torch.Tensor, int], torch.Tensor],
    score_fn: Callable[[torch.Tensor, int], torch.Tensor],
    dataset,
    *,
    n_classes: int,
    summed: bool = True,
    classes: Sequence[int] | None = None,
    mean=None,
    std=None,
    max_images: int | None = 8,
    steps: int = 16,
    baseline: str = "blur",
    blur_sigma: float = 10.0,
    blur_reference_size: int | None = 224,
    noise_std: float = 0.2,
    noise_clip: float = 0.25,
    seed: int = 0,
    box_half_size: float = 36,
    box_reference_size: int | None = 224,
    iou_threshold: float = 0.5,
    duplicate_threshold: float = 0.9,
    center: bool = True,
    upsample: str = "bilinear",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    active: torch.Tensor | None = None,
) -> KeypointFreeResult:
    """Deletion/insertion AUC, box stability and redundancy of any model's class maps on a test set.

    Args:
        maps_fn: ``(x [B, 3, H, W] normalised, c) -> [B, k, h, w]`` class c's maps, higher where the prototype is
            (phpn: oriented maps), the same k for every class.
        score_fn: ``(x, c) -> [B, k + 1]`` with ``summed`` (column i: map i's score, column k: the class logit, the
            summed map's score) or ``[B, k]`` without (column i: map i's score).
        dataset: test set following :mod:`phpn_core.data.base`'s contract (keypoints not needed).
        n_classes: the model's C; classes: the classes to evaluate (default all; each must have images).
        mean, std: normalisation (default the dataset's).
        max_images: the first ``max_images`` images of each class (dataset order) get deletion/insertion curves
            (None: all); box stability and redundancy use all of the class's images.
        steps, baseline, blur_sigma, blur_reference_size: the perturbation (:func:`deletion_insertion`).
        noise_std, noise_clip, seed: ProtoEval's noise; box_half_size, box_reference_size, iou_threshold: the box.
        duplicate_threshold, center: redundancy (:func:`map_redundancy`).
        upsample, device, batch_size: as in :func:`~phpn_core.evaluation.protoeval.protoeval_maps`.
        active: ``[C, k]`` bool, the maps that count (default all): the unused slots of a class with fewer
            prototypes are left out of every mean, and of redundancy's pairs.

    Returns:
        :class:`KeypointFreeResult`.
    """
    who = "keypoint_free_maps"
    for name, fn in (("maps_fn", maps_fn), ("score_fn", score_fn)):
        if not callable(fn):
            raise TypeError(f"{who}: {name} must be callable (x [B, 3, H, W], c) -> tensor; got {fn!r:.60}.")
    _require_pos_int("n_classes", n_classes, "pass the model's number of classes C.")
    if max_images is not None:
        _require_pos_int("max_images", max_images, "e.g. max_images=8, or None for every image.")
    _check_perturbation(who, steps=steps, baseline=baseline, blur_sigma=blur_sigma,
                        blur_reference_size=blur_reference_size, upsample=upsample, batch_size=batch_size)
    noise_std = _require_float("noise_std", noise_std, hint="ProtoEval uses 0.2.")
    noise_clip = _require_float("noise_clip", noise_clip, hint="ProtoEval uses 0.25.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputValueError(f"{who}: seed must be an int >= 0; got {seed!r}.")
    if isinstance(duplicate_threshold, bool) or not isinstance(duplicate_threshold, (int, float)) \
            or not -1 <= duplicate_threshold <= 1:
        raise InputValueError(f"{who}: duplicate_threshold must be a cosine in [-1, 1]; got {duplicate_threshold!r} "
                              f"(default 0.9).")
    box_half_size_px(224, box_half_size=box_half_size, box_reference_size=box_reference_size)  # validate early
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mean, std = _resolve_norm(mean, std, dataset, who)
    classes, by_class = class_indices(dataset, classes, n_classes, who)
    active = check_active(active, n_classes, who)
    per_class: list[dict] = []
    ins_p, del_p, ins_c, del_c, stable_all = [], [], [], [], []
    n_excluded = 0
    k_seen = None
    with torch.no_grad():
        for c in classes:
            idx = by_class[c]
            clean_maps, stab = [], []
            for s in range(0, len(idx), batch_size):
                bidx = idx[s : s + batch_size]
                images = _load_images(dataset, bidx, who)
                x = normalize(images, mean, std).to(dev)
                m_clean = maps_fn(x, c)
                if not isinstance(m_clean, torch.Tensor) or m_clean.ndim != 4 or m_clean.shape[0] != len(bidx):
                    raise ShapeError(f"{who}: maps_fn(x, c={c}) must return [B={len(bidx)}, k, h, w]; got "
                                     f"{_desc(m_clean)}.")
                if k_seen is not None and m_clean.shape[1] != k_seen:
                    raise ShapeError(f"{who}: maps_fn(x, c={c}) returned k={m_clean.shape[1]} maps, earlier "
                                     f"k={k_seen}; expected the same k for every class.")
                k_seen = m_clean.shape[1]
                noisy = x + _noise_like(x, bidx, seed=seed, noise_std=noise_std, noise_clip=noise_clip)
                m_noisy = maps_fn(noisy, c)
                st, _ = box_stability(m_clean, m_noisy, image_size=tuple(images.shape[-2:]),
                                      box_half_size=box_half_size, box_reference_size=box_reference_size,
                                      upsample=upsample, iou_threshold=iou_threshold)
                stab.append(st)
                clean_maps.append(m_clean.detach().cpu())
            maps_c = torch.cat(clean_maps)  # [N, k, h, w]
            stable = torch.cat(stab)
            k = maps_c.shape[1]
            check_active_k(active, k, who)
            act = active[c] if active is not None else torch.ones(k, dtype=torch.bool)
            stable_all.append(stable[:, act].flatten())
            cos = map_redundancy(maps_c, center=center)
            red = float(max_cosine(cos[None], act[None])[0]) if int(act.sum()) > 1 else None
            # deletion / insertion on the first max_images images
            sel = idx[: max_images] if max_images is not None else idx
            images = _load_images(dataset, sel, who)
            x = normalize(images, mean, std).to(dev)
            sal = maps_c[: len(sel)].to(dev)
            if summed:
                sal = torch.cat([sal, sal.sum(1, keepdim=True)], 1)
            di = deletion_insertion(lambda xb, c=c: score_fn(xb, c), x, sal, steps=steps, baseline=baseline,
                                    blur_sigma=blur_sigma, blur_reference_size=blur_reference_size,
                                    upsample=upsample, batch_size=batch_size)
            n_excluded += int((~di.valid).sum())
            ip, dp = di.insertion_auc[:, :k], di.deletion_auc[:, :k]
            ins_p.append(ip[:, act].flatten())
            del_p.append(dp[:, act].flatten())
            row = {"class_index": int(c), "n_images": len(idx), "n_curve_images": len(sel), "k": int(act.sum()),
                   "insertion_auc": _nanmean(ip[:, act]), "deletion_auc": _nanmean(dp[:, act]),
                   "insertion_auc_per_prototype": [_nanmean(ip[:, i]) for i in range(k)],
                   "deletion_auc_per_prototype": [_nanmean(dp[:, i]) for i in range(k)],
                   "box_stability": float(stable[:, act].double().mean()),
                   "box_stability_per_prototype": stable.double().mean(0).tolist(),
                   "redundancy": red, "duplicate": (red is not None and red > duplicate_threshold),
                   "cosine": cos.tolist()}
            if summed:
                ic, dc = di.insertion_auc[:, k], di.deletion_auc[:, k]
                ins_c.append(ic)
                del_c.append(dc)
                row.update({"insertion_auc_class": _nanmean(ic), "deletion_auc_class": _nanmean(dc)})
            per_class.append(row)
    reds = [r["redundancy"] for r in per_class if r["redundancy"] is not None]
    single = k_seen == 1 and not summed  # one map per class: it is scored against the class logit
    ins, dele = _nanmean(torch.cat(ins_p)), _nanmean(torch.cat(del_p))
    return KeypointFreeResult(
        insertion_auc=ins, deletion_auc=dele,
        insertion_auc_class=_nanmean(torch.cat(ins_c)) if ins_c else (ins if single else None),
        deletion_auc_class=_nanmean(torch.cat(del_c)) if del_c else (dele if single else None),
        box_stability=float(torch.cat(stable_all).double().mean()),
        redundancy=float(sum(reds) / len(reds)) if reds else None,
        duplicate_rate=float(sum(r["duplicate"] for r in per_class) / len(per_class)) if reds else None,
        classes=list(classes), per_class=per_class, n_excluded=n_excluded,
        settings={"steps": steps, "baseline": baseline, "blur_sigma": float(blur_sigma),
                  "blur_reference_size": blur_reference_size, "max_images": max_images, "noise_std": noise_std,
                  "noise_clip": noise_clip, "seed": seed, "box_half_size": float(box_half_size),
                  "box_reference_size": box_reference_size, "iou_threshold": float(iou_threshold),
                  "duplicate_threshold": float(duplicate_threshold), "center": bool(center), "upsample": upsample,
                  "summed": bool(summed)},
    )


def keypoint_free(features_module, head: PartPrototypeHead, dataset, *,
                  prototypes_override: torch.Tensor | None = None, device: str | torch.device | None = None,
                  **options) -> KeypointFreeResult:
    """Keypoint-free metrics of a head's prototypes (or of other prototypes on the same model).

    Maps: ``head.explain(features_module(x), classes=[c]).oriented_heatmaps`` ``[B, k, h, w]``; scores: each
    prototype's contribution ``mean_hw(F . p_i)`` and the class logit of ``head`` (the original model's, exactly).

    Args:
        features_module: normalised images ``[B, 3, S, S]`` -> ``[B, D, h, w]``, in eval mode.
        head: :class:`PartPrototypeHead` ``[C, k, D]`` (not moved: a copy goes to ``device``).
        dataset: the test set; keypoints not needed.
        prototypes_override: ``[C, k', D]`` other prototypes (plain NMF, DFF concepts), signs +1; the logit is still
            ``head``'s.
        device: where to compute (default: the features module's device).
        **options: any keyword option of :func:`keypoint_free_maps` (``max_images``, ``steps``, ``seed``, ...).

    Returns:
        :class:`KeypointFreeResult`.
    """
    who = "keypoint_free"
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"{who}: head must be a PartPrototypeHead; got {type(head).__name__}.")
    _check_eval_mode(features_module, who)
    dev = _module_device(features_module, device)
    C, _, D = head.prototypes.shape
    base = _head_on(head, dev)
    if prototypes_override is not None:
        _require_tensor(f"{who}: prototypes_override", prototypes_override, 3, "[C, k', D]")
        if prototypes_override.shape[0] != C or prototypes_override.shape[2] != D:
            raise ShapeError(f"{who}: prototypes_override must have shape [C={C}, k', D={D}] (the head's classes and "
                             f"channels); got {_desc(prototypes_override)}.")
        ev = PartPrototypeHead(prototypes_override.detach().to(dev, head.prototypes.dtype), base.bias.detach())
    else:
        ev = base
    dtype = ev.prototypes.dtype
    weight, bias = base.weight, base.bias

    def maps_fn(x, c):
        return ev.explain(features_module(x).to(dtype), classes=[c]).oriented_heatmaps[:, 0]

    def score_fn(x, c):
        fmap = features_module(x).to(dtype)
        contrib = ev.explain(fmap, classes=[c]).contributions[:, 0]  # [B, k]
        logit = fmap.mean((2, 3)) @ weight[c] + bias[c]  # [B]
        return torch.cat([contrib, logit[:, None]], 1)

    act = ev.active.cpu()  # unused slots (zero prototypes) count nowhere
    res = keypoint_free_maps(maps_fn, score_fn, dataset, n_classes=C, summed=True, device=dev,
                             active=None if bool(act.all()) else act, **options)
    res.settings["prototypes"] = "override" if prototypes_override is not None else "head"
    return res


def keypoint_free_gradcam(features_module, weight: torch.Tensor, bias: torch.Tensor | None, dataset, *,
                          device: str | torch.device | None = None, **options) -> KeypointFreeResult:
    """Keypoint-free metrics of Grad-CAM (:func:`~phpn_core.evaluation.baselines.gradcam_heatmaps`, one map per
    image for its class) against the class logit ``mean_hw(F) . weight[c] + bias[c]``; ``weight`` ``[C, D]``,
    ``bias`` ``[C]`` or None. ``redundancy``/``duplicate_rate`` are None (one map); ``insertion_auc`` equals
    ``insertion_auc_class``. ``**options``: as :func:`keypoint_free_maps`."""
    who = "keypoint_free_gradcam"
    _check_eval_mode(features_module, who)
    _require_tensor(f"{who}: weight", weight, 2, "[C, D]")
    dev = _module_device(features_module, device)
    W = weight.detach().to(dev)
    b = (bias.detach() if bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)).to(dev, W.dtype)

    def maps_fn(x, c):
        return gradcam_heatmaps(features_module, W, b, x, c)[:, None]

    def score_fn(x, c):
        return (features_module(x).to(W.dtype).mean((2, 3)) @ W[c] + b[c])[:, None]

    res = keypoint_free_maps(maps_fn, score_fn, dataset, n_classes=W.shape[0], summed=False, device=dev, **options)
    res.settings["prototypes"] = "gradcam"
    return res
