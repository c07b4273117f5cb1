"""ProtoEval (Huang et al., "Evaluation and Improvement of Interpretability for Self-Explainable Part-Prototype
Networks", ICCV 2023; protocol of the reference code ``hqhQAQ/EvalProtoPNet``, ``util/eval_interpretability.py``)
    For each class c, each of its k prototypes is evaluated on the class's test images:

    - region: the prototype's heatmap is upsampled to the image size (:func:`peak_locations`), its argmax
      ``(row, col)`` (first in row-major order on ties) is the centre of a box ``[row - hy, row + hy] x
      [col - hx, col + hx]`` clipped to ``[0, H] x [0, W]``, bounds inclusive; ``hy = hx = 36`` px at 224 px and
      scaled with the image (:func:`box_half_size_px`: 18 px at 112 px);
    - a part is *covered* when it is visible and its keypoint ``(x, y)`` lies in the box (:func:`part_coverage`);
    - **consistency** (:func:`consistency`): a prototype is consistent when for some part, the fraction of the
      class's images *in which that part is visible* where it is covered is ``>= 0.8``; parts never visible in the
      class are ignored. Score = % of consistent prototypes.
    - **stability** (:func:`stability`): noise ``clip(N(0, 0.2), -0.25, 0.25)`` is added to the *normalised*
      input; per prototype, the fraction of images whose covered-part vector ``[P]`` is unchanged. Score = mean
      over prototypes x 100.

    The loop takes any map function (:func:`protoeval_maps`); :func:`protoeval` gives it a head's oriented maps.

    Protocol decisions (where the reference code is silent or CUB-specific):

    - Keypoints are float pixel coordinates of the returned image, ``x`` = column, ``y`` = row, in the same pixel
      index units as the argmax (the reference truncates CUB's rescaled keypoints to ints first; phpn's datasets
      already give keypoints on the returned image, so they are compared as they are).
    - Upsampling: ``"bilinear"`` (``align_corners=False``) by default; the reference uses OpenCV's bicubic
      resize, available as ``upsample="bicubic"`` (same kernel, a = -0.75, and the same half-pixel centres).
    - Heatmaps are the *oriented* maps ``signs * F . p~`` (:attr:`~phpn_core.method.head.Explanation.oriented_heatmaps`):
      a prototype with a negative alpha carries its part as negative evidence, so its raw map is *lowest* where
      the part is; the evaluation locates the part, whatever the sign of its evidence (``use_oriented=False``
      evaluates raw maps).
    - Stability noise is reproducible: image ``i`` of the dataset gets noise from a CPU ``torch.Generator``
      seeded with ``seed * 1_000_003 + i``, so the noise does not depend on batching, class selection or device
      (the reference draws unseeded noise per batch).
    - Box half-sizes are rounded half up to whole pixels, like the reference's integer boxes.

Size: the protocol in one place (its three metrics, the one loop every model goes through and the head wrapper),
as in the reference code; input checks and masks live in ``_checks``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    masked_mean,
    _desc,
    _head_on,
    _module_device,
    _noise_like,
    _require_float,
    _require_pos_int,
    _require_tensor,
    _resolve_norm,
)
from phpn_core.method.head import PartPrototypeHead

__all__ = ['box_half_size_px', 'peak_locations', 'part_coverage', 'consistency', 'stability', 'protoeval', 'protoeval_maps', 'ConsistencyResult', 'StabilityResult', 'ClassProtoEval', 'ProtoEvalResult', 'UPSAMPLE_MODES']


UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest")


# ================================================================================================ ProtoEval: geometry

def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise InputValueError(f"image_size must be an int S or a pair (H, W); got {image_size!r}.")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list, torch.Size)) and len(image_size) == 2:
        hw = (image_size[0], image_size[1])
    else:
        raise InputValueError(f"image_size must be an int S or a pair (H, W); got {image_size!r}.")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw):
        raise InputValueError(f"image_size must hold positive ints; got {image_size!r}.")
    return int(hw[0]), int(hw[1])


def box_half_size_px(image_size, *, box_half_size: float = 36, box_reference_size: int | None = 224
                     ) -> tuple[int, int]:
    """Half-sizes ``(hy, hx)`` in pixels of the ProtoEval box on an image of ``image_size`` (S or (H, W)).

    Scaling rule: ``box_half_size`` is given in pixels at ``box_reference_size`` (ProtoEval: 36 at 224) and scaled
    linearly with each side, ``round_half_up(box_half_size * side / box_reference_size)``: 18 at 112 px, 36 at
    224 px. ``box_reference_size=None`` uses ``box_half_size`` as pixels on every image size.
    """
    H, W = _image_hw(image_size)
    hs = _require_float("box_half_size", box_half_size, hint="ProtoEval uses 36 (pixels at 224 px).")
    if box_reference_size is None:
        return int(math.floor(hs + 0.5)), int(math.floor(hs + 0.5))
    _require_pos_int("box_reference_size", box_reference_size, "ProtoEval uses 224, or pass None for no scaling.")
    return (int(math.floor(hs * H / box_reference_size + 0.5)), int(math.floor(hs * W / box_reference_size + 0.5)))


def peak_locations(heatmaps: torch.Tensor, *, image_size, upsample: str = "bilinear") -> torch.Tensor:
    """Argmax ``(row, col)`` of each heatmap after upsampling it to the image.

    Args:
        heatmaps: ``[N, k, h, w]`` (not modified).
        image_size: S or (H, W) of the images the maps belong to.
        upsample: ``"bilinear"``/``"bicubic"`` (``align_corners=False``) or ``"nearest"``; maps already at the
            image size are used as they are.

    Returns:
        ``[N, k, 2]`` long, ``(row, col)`` pixel indices; ties go to the first maximum in row-major order.
    """
    _require_tensor("peak_locations: heatmaps", heatmaps, 4, "[N, k, h, w]")
    if upsample not in UPSAMPLE_MODES:
        raise InputValueError(f"upsample must be one of {UPSAMPLE_MODES}; got {upsample!r}.")
    if not heatmaps.is_floating_point():
        raise TypeError(f"peak_locations: heatmaps must be float; got {heatmaps.dtype}.")
    H, W = _image_hw(image_size)
    N, k, h, w = heatmaps.shape
    if heatmaps.numel() and not bool(torch.isfinite(heatmaps).all()):
        raise InputValueError("peak_locations: heatmaps contain NaN or inf; expected finite maps. Check the prototypes "
                              "and feature maps.")
    maps = heatmaps.detach().reshape(N * k, 1, h, w)
    out = torch.empty(N * k, dtype=torch.long, device=heatmaps.device)
    chunk = max(1, (1 << 24) // (H * W))
    for s in range(0, N * k, chunk):
        m = maps[s : s + chunk]
        if (h, w) != (H, W):
            kw = {} if upsample == "nearest" else {"align_corners": False}
            m = F.interpolate(m, size=(H, W), mode=upsample, **kw)
        out[s : s + chunk] = m.flatten(1).argmax(1)
    return torch.stack([out // W, out % W], -1).reshape(N, k, 2)


def part_coverage(
    heatmaps: torch.Tensor,
    keypoints: torch.Tensor,
    *,
    image_size,
    box_half_size: float = 36,
    box_reference_size: int | None = 224,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """Which parts each prototype's ProtoEval box covers on each image.

    Args:
        heatmaps: ``[N, k, h, w]`` one map per image and prototype (oriented: high where the prototype's part is).
        keypoints: ``[N, P, 3]`` rows ``(x, y, visible)``, ``x`` = column and ``y`` = row in pixels of the image.
        image_size: S or (H, W) of the images.
        box_half_size, box_reference_size: the box's half-size, see :func:`box_half_size_px`.
        upsample: see :func:`peak_locations`.

    Returns:
        ``covered [N, k, P]`` bool: part p is visible on image n and its keypoint lies in the box
        ``[row - hy, row + hy] x [col - hx, col + hx]`` (clipped to ``[0, H] x [0, W]``, bounds inclusive) around
        the argmax ``(row, col)`` of prototype k's upsampled map. Invisible parts are never covered.
    """
    _require_tensor("part_coverage: heatmaps", heatmaps, 4, "[N, k, h, w]")
    _require_tensor("part_coverage: keypoints", keypoints, 3, "[N, P, 3]")
    if keypoints.shape[0] != heatmaps.shape[0] or keypoints.shape[2] != 3:
        raise ShapeError(
            f"part_coverage: keypoints must have shape [N={heatmaps.shape[0]}, P, 3] (one row (x, y, visible) per "
            f"part, N as in heatmaps {tuple(heatmaps.shape)}); got {_desc(keypoints)}."
        )
    H, W = _image_hw(image_size)
    hy, hx = box_half_size_px((H, W), box_half_size=box_half_size, box_reference_size=box_reference_size)
    peaks = peak_locations(heatmaps, image_size=(H, W), upsample=upsample)  # [N, k, 2]
    return _covered_from_peaks(peaks, keypoints, H, W, hy, hx)


def _covered_from_peaks(peaks: torch.Tensor, keypoints: torch.Tensor, H: int, W: int, hy: int, hx: int
                        ) -> torch.Tensor:
    """peaks ``[N, k, 2]`` (row, col), keypoints ``[N, P, 3]`` -> covered ``[N, k, P]`` (see part_coverage)."""
    kp = keypoints.detach().to(peaks.device, torch.float64)
    visible = kp[..., 2] > 0.5  # [N, P]
    kx = torch.where(visible, kp[..., 0], torch.zeros_like(kp[..., 0]))[:, None, :]  # [N, 1, P]
    ky = torch.where(visible, kp[..., 1], torch.zeros_like(kp[..., 1]))[:, None, :]
    y1, y2, x1, x2 = _box_bounds(peaks, H, W, hy, hx)  # each [N, k, 1]
    inside = (ky >= y1) & (ky <= y2) & (kx >= x1) & (kx <= x2)
    return inside & visible[:, None, :]


# ================================================================================================ ProtoEval: scores

@dataclass(frozen=True)
class ConsistencyResult:
    """One class's consistency. ``score``: % of consistent prototypes; ``per_prototype`` bool ``[k]``;
    ``per_prototype_part_rate`` float64 ``[k, P]`` (fraction of the images where part p is visible in which
    prototype k covers it; 0 for parts never visible); ``best_part`` long ``[k]`` (argmax of the rate);
    ``visible_count`` long ``[P]``; ``threshold``."""

    score: float
    per_prototype: torch.Tensor
    per_prototype_part_rate: torch.Tensor
    best_part: torch.Tensor
    visible_count: torch.Tensor
    threshold: float


@dataclass(frozen=True)
class StabilityResult:
    """One class's stability. ``score``: mean of ``per_prototype`` x 100; ``per_prototype`` float64 ``[k]`` in
    [0, 1]: the fraction of images whose covered-part vector is unchanged under noise."""

    score: float
    per_prototype: torch.Tensor


def consistency(covered: torch.Tensor, visible: torch.Tensor, *, threshold: float = 0.8,
                active: torch.Tensor | None = None) -> ConsistencyResult:
    """ProtoEval consistency of one class's k prototypes over its N images.

    Args:
        covered: ``[N, k, P]`` bool, from :func:`part_coverage`.
        visible: ``[N, P]`` bool (or {0, 1}), part p visible on image n.
        threshold: a prototype is consistent when some part's rate is ``>= threshold`` (ProtoEval: 0.8).
        active: ``[k]`` bool, the prototypes the score counts (default all; unused slots of a class with fewer
            prototypes are not counted).

    Returns:
        :class:`ConsistencyResult`.

    Raises:
        InputValueError: a part is covered on an image where it is not visible (coverage must come from the same
            keypoints), no images, or a threshold outside (0, 1].
    """
    _require_tensor("consistency: covered", covered, 3, "[N, k, P]")
    _require_tensor("consistency: visible", visible, 2, "[N, P]")
    N, k, P = covered.shape
    if tuple(visible.shape) != (N, P):
        raise ShapeError(f"consistency: visible must have shape [N={N}, P={P}] like covered; got {_desc(visible)}.")
    if N == 0:
        raise InputValueError("consistency: no images (N=0); expected at least one image of the class.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InputValueError(f"consistency: threshold must be in (0, 1]; got {threshold!r} (ProtoEval uses 0.8).")
    cov, vis = covered.bool(), visible.bool().to(covered.device)
    if bool((cov & ~vis[:, None, :]).any()):
        raise InputValueError(
            "consistency: some part is covered on an image where it is not visible; expected covered to imply "
            "visible. Fix: compute covered with part_coverage from the same keypoints as visible."
        )
    vis_count = vis.sum(0)  # [P]
    rate = cov.sum(0).double() / vis_count.clamp_min(1).double()  # [k, P]; never-visible parts -> 0
    per = (rate >= threshold).any(-1)
    return ConsistencyResult(
        score=masked_mean(per.double(), active) * 100, per_prototype=per.cpu(), per_prototype_part_rate=rate.cpu(),
        best_part=rate.argmax(-1).cpu() if P else torch.zeros(k, dtype=torch.long), visible_count=vis_count.cpu(),
        threshold=float(threshold),
    )


def stability(covered_clean: torch.Tensor, covered_noisy: torch.Tensor,
              active: torch.Tensor | None = None) -> StabilityResult:
    """ProtoEval stability of one class's k prototypes: ``covered_clean``/``covered_noisy`` ``[N, k, P]`` bool
    (``active [k]`` bool: the prototypes the score counts, default all).

    An image counts as stable for a prototype when its whole covered-part vector ``[P]`` is unchanged.
    """
    _require_tensor("stability: covered_clean", covered_clean, 3, "[N, k, P]")
    _require_tensor("stability: covered_noisy", covered_noisy, 3, "[N, k, P]")
    if covered_clean.shape != covered_noisy.shape:
        raise ShapeError(
            f"stability: covered_clean and covered_noisy must have the same shape [N, k, P]; got "
            f"{tuple(covered_clean.shape)} and {tuple(covered_noisy.shape)}."
        )
    if covered_clean.shape[0] == 0:
        raise InputValueError("stability: no images (N=0); expected at least one image of the class.")
    same = (covered_clean.bool() == covered_noisy.bool().to(covered_clean.device)).all(-1)  # [N, k]
    per = same.double().mean(0)
    return StabilityResult(score=masked_mean(per, active) * 100, per_prototype=per.cpu())


@dataclass(frozen=True)
class ClassProtoEval:
    """ProtoEval of one class: ``class_index``; ``image_indices`` (dataset indices, ``N`` of them); ``covered`` and
    ``covered_noisy`` bool ``[N, k, P]``; ``visible`` bool ``[N, P]``; ``peaks`` long ``[N, k, 2]`` (row, col of
    each clean map's argmax); ``consistency`` and ``stability`` results."""

    class_index: int
    image_indices: list[int]
    covered: torch.Tensor
    covered_noisy: torch.Tensor
    visible: torch.Tensor
    peaks: torch.Tensor
    consistency: ConsistencyResult
    stability: StabilityResult


@dataclass(frozen=True)
class ProtoEvalResult:
    """ProtoEval over ``C' = len(classes)`` classes of k prototypes.

    ``consistency``/``stability``: scores in % over all ``C' * k`` prototypes. ``consistent`` bool ``[C', k]``,
    ``part_rate`` float64 ``[C', k, P]``, ``stable_fraction`` float64 ``[C', k]``; ``per_class``: one
    :class:`ClassProtoEval` per class, in ``classes`` order; ``settings``: the protocol's parameters.
    """

    consistency: float
    stability: float
    classes: list[int]
    consistent: torch.Tensor
    part_rate: torch.Tensor
    stable_fraction: torch.Tensor
    per_class: list[ClassProtoEval]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (scores, per-class scores and per-prototype values; no per-image data)."""
        return {
            "consistency": self.consistency, "stability": self.stability, "classes": list(self.classes),
            "consistency_per_class": [r.consistency.score for r in self.per_class],
            "stability_per_class": [r.stability.score for r in self.per_class],
            "n_images_per_class": [len(r.image_indices) for r in self.per_class],
            "consistent": self.consistent.tolist(), "stable_fraction": self.stable_fraction.tolist(),
            "best_part": [r.consistency.best_part.tolist() for r in self.per_class],
            "settings": dict(self.settings),
        }


def _dataset_labels(dataset) -> list[int]:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    return [int(v) for v in labels]


def load_batch(dataset, indices: Sequence[int], who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B, 3, H, W]`` in [0, 1] and keypoints ``[B, P, 3]`` of the given dataset items."""
    images, kps = [], []
    for i in indices:
        item = dataset[i]
        if "keypoints" not in item:
            raise InputValueError(
                f"{who}: item {i} of {type(dataset).__name__} has no 'keypoints'; ProtoEval needs part keypoints "
                f"[P, 3] (x, y, visible) per image. Use a dataset with parts (SynthParts, CUB)."
            )
        images.append(item["image"])
        kps.append(torch.as_tensor(item["keypoints"], dtype=torch.float32))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise ShapeError(f"{who}: images of one batch differ in shape ({sorted(shapes)}); expected one size [3, S, S].")
    kshapes = {tuple(t.shape) for t in kps}
    if len(kshapes) != 1 or len(next(iter(kshapes))) != 2 or next(iter(kshapes))[1] != 3:
        raise ShapeError(f"{who}: keypoints must all have shape [P, 3]; got {sorted(kshapes)}.")
    return torch.stack(images), torch.stack(kps)


def class_indices(dataset, classes, n_classes: int, who: str) -> tuple[list[int], dict[int, list[int]]]:
    labels = _dataset_labels(dataset)
    if classes is None:
        classes = list(range(n_classes))
    classes = list(classes)
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n_classes]
    if bad:
        raise InputValueError(f"{who}: classes must be ints in [0, {n_classes}); got {bad[:5]}.")
    if len(set(classes)) != len(classes):
        raise InputValueError(f"{who}: classes contains duplicates; got {classes}.")
    by_class: dict[int, list[int]] = {c: [] for c in classes}
    for i, lab in enumerate(labels):
        if lab in by_class:
            by_class[lab].append(i)
    empty = [c for c in classes if not by_class[c]]
    if empty:
        raise InputValueError(
            f"{who}: classes {empty[:10]} have no images in the dataset ({len(labels)} items); ProtoEval needs each "
            f"evaluated class's test images. Fix: pass classes=[...] with the classes the dataset holds."
        )
    return classes, by_class


def _check_common(who: str, *, batch_size, noise_std, noise_clip, seed, upsample, threshold, box_half_size,
                  box_reference_size) -> tuple[float, float]:
    """Validate the options :func:`protoeval` and :func:`protoeval_maps` share; returns (noise_std, noise_clip)."""
    _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")
    noise_std = _require_float("noise_std", noise_std, hint="ProtoEval uses 0.2.")
    noise_clip = _require_float("noise_clip", noise_clip, hint="ProtoEval uses 0.25.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputValueError(f"{who}: seed must be an int >= 0; got {seed!r}.")
    if upsample not in UPSAMPLE_MODES:
        raise InputValueError(f"{who}: upsample must be one of {UPSAMPLE_MODES}; got {upsample!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InputValueError(f"{who}: threshold must be in (0, 1]; got {threshold!r} (ProtoEval uses 0.8).")
    box_half_size_px(224, box_half_size=box_half_size, box_reference_size=box_reference_size)  # validate early
    return noise_std, noise_clip


def protoeval_maps(
    maps_fn,
    dataset,
    *,
    n_classes: int,
    classes: Sequence[int] | None = None,
    mean=None,
    std=None,
    noise_std: float = 0.2,
    noise_clip: float = 0.25,
    seed: int = 0,
    threshold: float = 0.8,
    box_half_size: float = 36,
    box_reference_size: int | None = 224,
    upsample: str = "bilinear",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    active: torch.Tensor | None = None,
) -> ProtoEvalResult:
    """ProtoEval consistency and stability of any part-prototype model, given by its class maps.

    The one ProtoEval loop: :func:`protoeval` (phpn's heads, the NMF/DFF baselines) and ante-hoc models such as
    :mod:`phpn_core.protopnet` go through it. For each class c, its images are normalised and ``maps_fn(x, c)``
    gives class c's k maps, scored as in :func:`protoeval` (clean: consistency; with the noise: stability).

    Args:
        maps_fn: ``maps_fn(x, c) -> [B, k, h, w]`` float: normalised images ``x [B, 3, S, S]`` (on ``device``) and a
            class index ``c`` -> one map per image and prototype of class c, *higher where the prototype is*
            (phpn: oriented heatmaps; ProtoPNet: similarity maps), the same k for every class. Called under
            ``torch.no_grad()``; put modules in eval mode first.
        dataset: the test set, following :mod:`phpn_core.data.base`'s contract with ``keypoints``.
        n_classes: the model's number of classes C (``classes`` are checked against it).
        classes: the classes to evaluate (default all C); each must have images in ``dataset``.
        mean, std: normalisation (default ``dataset.mean``/``dataset.std``).
        noise_std, noise_clip, seed: the stability noise (seeded per image, see the module docstring).
        threshold: consistency threshold.
        box_half_size, box_reference_size, upsample: the box, see :func:`part_coverage`.
        device: where the images are put before ``maps_fn`` sees them (default: the CPU).
        batch_size: images per call of ``maps_fn``.
        active: ``[C, k]`` bool, the prototypes that count (default all): a class with fewer than k prototypes
            has unused slots, whose maps are zero and whose scores are left out of every mean.

    Returns :class:`ProtoEvalResult` (its ``[C', k]`` tensors stack the classes: the same k for every class).

    Raises ShapeError when ``maps_fn`` returns other than ``[B, k, h, w]`` or k changes between calls.
    """
    who = "protoeval_maps"
    if not callable(maps_fn):
        raise TypeError(f"{who}: maps_fn must be callable (x [B, 3, S, S], c) -> [B, k, h, w]; got {maps_fn!r:.60}.")
    _require_pos_int("n_classes", n_classes, "pass the model's number of classes C.")
    noise_std, noise_clip = _check_common(
        who, batch_size=batch_size, noise_std=noise_std, noise_clip=noise_clip, seed=seed, upsample=upsample,
        threshold=threshold, box_half_size=box_half_size, box_reference_size=box_reference_size)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mean, std = _resolve_norm(mean, std, dataset, who)
    classes, by_class = class_indices(dataset, classes, n_classes, who)
    active = check_active(active, n_classes, who)
    return _run(maps_fn, dataset, classes, by_class, who=who, dev=dev, mean=mean, std=std, noise_std=noise_std,
                noise_clip=noise_clip, seed=seed, threshold=threshold, box_half_size=box_half_size,
                box_reference_size=box_reference_size, upsample=upsample, batch_size=batch_size, active=active)


def _run(maps_fn, dataset, classes, by_class, *, who, dev, mean, std, noise_std, noise_clip, seed, threshold,
         box_half_size, box_reference_size, upsample, batch_size, active=None) -> ProtoEvalResult:
    """The ProtoEval loop over validated inputs (see :func:`protoeval_maps`)."""

    def coverage(x: torch.Tensor, c: int, kps: torch.Tensor, size, k_expected) -> tuple[torch.Tensor, torch.Tensor]:
        maps = maps_fn(x, c)  # [B, k, h, w]
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or maps.shape[0] != x.shape[0]:
            raise ShapeError(
                f"{who}: maps_fn(x, c={c}) must return a tensor [B={x.shape[0]}, k, h, w] (one map per image and "
                f"prototype of class c); got {_desc(maps)}. Fix: return the class's prototype maps, e.g. "
                f"maps[:, None] for a single prototype."
            )
        if k_expected is not None and maps.shape[1] != k_expected:
            raise ShapeError(f"{who}: maps_fn(x, c={c}) returned k={maps.shape[1]} maps, earlier k={k_expected}; "
                             f"expected the same number of prototype maps for every batch and class.")
        peaks = peak_locations(maps, image_size=size, upsample=upsample)  # [B, k, 2]
        hy, hx = box_half_size_px(size, box_half_size=box_half_size, box_reference_size=box_reference_size)
        cov = _covered_from_peaks(peaks, kps, size[0], size[1], hy, hx)
        return cov.cpu(), peaks.cpu()

    per_class: list[ClassProtoEval] = []
    sizes: set = set()
    k_seen = None
    with torch.no_grad():
        for c in classes:
            idx = by_class[c]
            covs, covs_noisy, vis, peaks = [], [], [], []
            for s in range(0, len(idx), batch_size):
                bidx = idx[s : s + batch_size]
                images, kps = load_batch(dataset, bidx, who)
                size = tuple(images.shape[-2:])
                sizes.add(size)
                x = normalize(images, mean, std).to(dev)
                cov, pk = coverage(x, c, kps, size, k_seen)
                k_seen = cov.shape[1]
                check_active_k(active, k_seen, who)
                noisy = x + _noise_like(x, bidx, seed=seed, noise_std=noise_std, noise_clip=noise_clip)
                cov_n, _ = coverage(noisy, c, kps, size, k_seen)
                covs.append(cov)
                covs_noisy.append(cov_n)
                vis.append(kps[..., 2] > 0.5)
                peaks.append(pk)
            covered, covered_noisy, visible = torch.cat(covs), torch.cat(covs_noisy), torch.cat(vis)
            act = None if active is None else active[c].cpu()
            per_class.append(ClassProtoEval(
                class_index=c, image_indices=list(idx), covered=covered, covered_noisy=covered_noisy,
                visible=visible, peaks=torch.cat(peaks),
                consistency=consistency(covered, visible, threshold=threshold, active=act),
                stability=stability(covered, covered_noisy, act),
            ))
    consistent = torch.stack([r.consistency.per_prototype for r in per_class])
    stable = torch.stack([r.stability.per_prototype for r in per_class])
    part_rate = torch.stack([r.consistency.per_prototype_part_rate for r in per_class])
    size_list = sorted(sizes)
    act = None if active is None else active[torch.as_tensor(classes, dtype=torch.long)].cpu()
    return ProtoEvalResult(
        consistency=masked_mean(consistent, act) * 100, stability=masked_mean(stable, act) * 100,
        classes=classes, consistent=consistent, part_rate=part_rate, stable_fraction=stable, per_class=per_class,
        settings={
            "threshold": float(threshold), "noise_std": noise_std, "noise_clip": noise_clip, "seed": seed,
            "box_half_size": float(box_half_size), "box_reference_size": box_reference_size,
            "box_half_size_px": [list(box_half_size_px(s, box_half_size=box_half_size,
                                                        box_reference_size=box_reference_size)) for s in size_list],
            "image_size": [list(s) for s in size_list], "upsample": upsample,
        },
    )


def protoeval(
    features_module,
    head: PartPrototypeHead,
    dataset,
    *,
    classes: Sequence[int] | None = None,
    mean=None,
    std=None,
    noise_std: float = 0.2,
    noise_clip: float = 0.25,
    seed: int = 0,
    threshold: float = 0.8,
    box_half_size: float = 36,
    box_reference_size: int | None = 224,
    upsample: str = "bilinear",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    use_oriented: bool = True,
    prototypes_override: torch.Tensor | None = None,
) -> ProtoEvalResult:
    """ProtoEval consistency and stability of a head's prototypes on a test set with part keypoints.

    For each class c: its images (label c) are normalised (``mean``/``std``), passed through ``features_module``,
    and class c's k prototypes give heatmaps ``[N, k, h, w]`` (``head.explain(fmap, classes=[c])``, oriented unless
    ``use_oriented=False``); :func:`part_coverage` and :func:`consistency` score them. The same images with noise
    ``clip(N(0, noise_std), +-noise_clip)`` added to the *normalised* input give the noisy coverage, and
    :func:`stability` compares the two. See the module docstring for the protocol and its decisions.

    A thin wrapper of :func:`protoeval_maps` with the head's maps as ``maps_fn``
    (``maps_fn(x, c) = head.explain(features_module(x), classes=[c]).oriented_heatmaps[:, 0]``).

    Args:
        features_module: normalised images ``[B, 3, S, S]`` -> feature maps ``[B, D, h, w]``, in eval mode.
        head: the :class:`PartPrototypeHead` (C classes, k prototypes, D channels).
        dataset: the test set, following :mod:`phpn_core.data.base`'s contract with ``keypoints``.
        classes: the classes to evaluate (default all C); each must have images in ``dataset``.
        mean, std: normalisation (default ``dataset.mean``/``dataset.std``).
        noise_std, noise_clip, seed: the stability noise (seeded per image, see the module docstring).
        threshold: consistency threshold.
        box_half_size, box_reference_size, upsample: the box, see :func:`part_coverage`.
        device: where to compute (default: the features module's device). The caller's head is not moved.
        batch_size: images per forward pass.
        use_oriented: locate ``signs * heatmaps`` (default) or the raw heatmaps.
        prototypes_override: ``[C, k', D]`` other prototypes to evaluate on the same model and images (baselines:
            plain NMF prototypes, DFF concepts), used with signs +1 (their maps are already high where their part
            is).

    Returns:
        :class:`ProtoEvalResult` (scores in %, per-class and per-prototype results).
    """
    who = "protoeval"
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"{who}: head must be a PartPrototypeHead; got {type(head).__name__}.")
    _check_eval_mode(features_module, who)
    noise_std, noise_clip = _check_common(
        who, batch_size=batch_size, noise_std=noise_std, noise_clip=noise_clip, seed=seed, upsample=upsample,
        threshold=threshold, box_half_size=box_half_size, box_reference_size=box_reference_size)
    dev = _module_device(features_module, device)
    C, _, D = head.prototypes.shape
    if prototypes_override is not None:
        _require_tensor(f"{who}: prototypes_override", prototypes_override, 3, "[C, k', D]")
        if prototypes_override.shape[0] != C or prototypes_override.shape[2] != D:
            raise ShapeError(
                f"{who}: prototypes_override must have shape [C={C}, k', D={D}] (the head's classes and channels); got "
                f"{_desc(prototypes_override)}."
            )
        ev_head = PartPrototypeHead(prototypes_override.detach().to(dev, head.prototypes.dtype),
                                    head.bias.detach().to(dev))
    else:
        ev_head = _head_on(head, dev)
    dtype = ev_head.prototypes.dtype
    mean, std = _resolve_norm(mean, std, dataset, who)
    classes, by_class = class_indices(dataset, classes, C, who)

    def maps_fn(x: torch.Tensor, c: int) -> torch.Tensor:
        ex = ev_head.explain(features_module(x).to(dtype), classes=[c])
        return (ex.oriented_heatmaps if use_oriented else ex.heatmaps)[:, 0]  # [B, k, h, w]

    # unused slots (zero prototypes of a class decomposed with fewer) count nowhere; with every slot in use
    # (the usual case) this is no mask at all
    act = ev_head.active.cpu()
    res = _run(maps_fn, dataset, classes, by_class, who=who, dev=dev, mean=mean, std=std, noise_std=noise_std,
               noise_clip=noise_clip, seed=seed, threshold=threshold, box_half_size=box_half_size,
               box_reference_size=box_reference_size, upsample=upsample, batch_size=batch_size,
               active=None if bool(act.all()) else act)
    res.settings.update({"use_oriented": bool(use_oriented),
                         "prototypes": "override" if prototypes_override is not None else "head"})
    return res
