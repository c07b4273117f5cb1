"""Evaluation of a decomposed head: accuracy parity, ProtoEval (consistency, stability), faithfulness axioms.

Algorithms only: every function returns numbers and tensors; drawing them is :mod:`phpn_core.report`'s job.

Accuracy parity
    :func:`accuracy_parity` runs the original head (``GAP(F) @ W^T + b``) and the decomposed head (sum of the
    prototype contributions + b) on the *same* feature maps and reports both accuracies and the largest logit
    difference; :func:`head_reconstruction_error` is ``max |sum_i p~_{c,i} - v_c|``.

ProtoEval (Huang et al., "Evaluation and Improvement of Interpretability for Self-Explainable Part-Prototype
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

    Protocol decisions (where the reference code is silent or CUB-specific):

    - Keypoints are float pixel coordinates of the returned image, ``x`` = column, ``y`` = row, in the same pixel
      index units as the argmax (the reference truncates CUB's rescaled keypoints to ints first; phpn's datasets
      already give keypoints on the returned image, so they are compared as they are).
    - Upsampling: ``"bilinear"`` (``align_corners=False``) by default; the reference uses OpenCV's bicubic
      resize, available as ``upsample="bicubic"`` (same kernel, a = -0.75, and the same half-pixel centres).
    - Heatmaps are the *oriented* maps ``signs * F . p~`` (:attr:`~phpn_core.head.Explanation.oriented_heatmaps`):
      a prototype with a negative alpha carries its part as negative evidence, so its raw map is *lowest* where
      the part is; the evaluation locates the part, whatever the sign of its evidence (``use_oriented=False``
      evaluates raw maps).
    - Stability noise is reproducible: image ``i`` of the dataset gets noise from a CPU ``torch.Generator``
      seeded with ``seed * 1_000_003 + i``, so the noise does not depend on batching, class selection or device
      (the reference draws unseeded noise per batch).
    - Box half-sizes are rounded half up to whole pixels, like the reference's integer boxes.

Faithfulness axioms, as measured numbers (0 up to float rounding for a faithful explanation; each has a test with a
deliberately broken explanation for which it is large):

- :func:`completeness_error`: ``contributions.sum(-1) + bias == logits`` (and ``heatmaps.mean == contributions``);
- :func:`sensitivity_check`: removing prototype i changes the logit by exactly its contribution (so a prototype
  with zero contribution changes nothing);
- :func:`linearity_check`: the explanation of ``a * head_a + b * head_b`` is ``a * expl_a + b * expl_b``;
- :func:`symmetry_check`: two identical feature channels with equal prototype weights get identical per-channel
  attributions (:func:`channel_attributions`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data.base import normalize
from .errors import InputValueError, ShapeError
from .head import Explanation, PartPrototypeHead

__all__ = [
    "accuracy_parity", "head_reconstruction_error",
    "box_half_size_px", "peak_locations", "part_coverage", "consistency", "stability", "protoeval",
    "ConsistencyResult", "StabilityResult", "ClassProtoEval", "ProtoEvalResult",
    "completeness_error", "sensitivity_check", "linearity_check", "symmetry_check", "channel_attributions",
]

UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest")
_NOISE_SEED_STRIDE = 1_000_003


# ================================================================================================ small helpers

def _desc(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _require_tensor(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}; got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ShapeError(f"{name}: expected shape {layout}; got {_desc(x)}.")
    return x


def _require_float(name: str, value, *, minimum: float = 0.0, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise InputValueError(f"{name} must be a finite number >= {minimum}; got {value!r}. {hint}")
    return float(value)


def _require_pos_int(name: str, value, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1; got {value!r}. {hint}")
    return value


def _module_device(module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _check_eval_mode(module, who: str) -> None:
    if isinstance(module, torch.nn.Module) and module.training:
        raise InputValueError(
            f"{who}: features_module is in training mode (BatchNorm/Dropout would make the feature maps depend on "
            f"the batch and on chance); expected eval mode. Fix: call features_module.eval() first."
        )


def _resolve_norm(mean, std, source, who: str):
    if mean is None:
        mean = getattr(source, "mean", None)
    if std is None:
        std = getattr(source, "std", None)
    if mean is None or std is None:
        raise InputValueError(
            f"{who}: no normalisation given and the dataset has no mean/std attributes; expected images in [0, 1] "
            f"and their normalisation. Fix: pass mean=..., std=... (mean=(0, 0, 0), std=(1, 1, 1) when the batches "
            f"are already normalised)."
        )
    return mean, std


def _head_on(head: PartPrototypeHead, device: torch.device) -> PartPrototypeHead:
    """The head on ``device`` without moving the caller's module (nn.Module.to works in place)."""
    if head.prototypes.device == device:
        return head
    return copy.deepcopy(head).to(device)


# ================================================================================================ accuracy parity

def _collate_xy(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def _feature_batches(features_module, source, *, batch_size: int, mean, std, device, who: str
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(fmap [B, D, h, w], labels [B])`` from a dataset, a loader, or precomputed feature maps."""
    if features_module is None:  # precomputed feature maps
        if isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(t, torch.Tensor) for t in source):
            fmaps, labels = source
            _require_tensor(f"{who}: precomputed feature maps", fmaps, 4, "[N, D, h, w]")
            if labels.ndim != 1 or labels.shape[0] != fmaps.shape[0]:
                raise ShapeError(
                    f"{who}: labels must have shape [N={fmaps.shape[0]}] to match the feature maps; got "
                    f"{_desc(labels)}."
                )
            for i in range(0, fmaps.shape[0], batch_size):
                yield fmaps[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
            return
        for batch in source:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise InputValueError(
                    f"{who}: with features_module=None, expected (feature maps [N, D, h, w], labels [N]) or an "
                    f"iterable of such batches; got a batch of type {type(batch).__name__}."
                )
            fm, lab = batch
            _require_tensor(f"{who}: precomputed feature maps", fm, 4, "[B, D, h, w]")
            yield fm.to(device), torch.as_tensor(lab).to(device)
        return

    if isinstance(source, Dataset) and not isinstance(source, DataLoader) and hasattr(source, "__len__"):
        mean, std = _resolve_norm(mean, std, source, who)
        loader: Iterable = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=0,
                                      collate_fn=_collate_xy)
    else:
        mean, std = _resolve_norm(mean, std, getattr(source, "dataset", None), who)
        loader = source
    with torch.no_grad():
        for batch in loader:
            if isinstance(batch, dict):
                x, y = batch["image"], batch["label"]
            elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
                x, y = batch[0], batch[1]
            else:
                raise InputValueError(
                    f"{who}: a loader batch must be a dict with 'image' and 'label' or a tuple (images, labels); got "
                    f"{type(batch).__name__}."
                )
            x = normalize(torch.as_tensor(x), mean, std).to(device)
            yield features_module(x), torch.as_tensor(y).to(device)


def accuracy_parity(
    features_module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head: PartPrototypeHead,
    loader_or_dataset,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    mean=None,
    std=None,
) -> dict:
    """Accuracy of the original and the decomposed head on the same feature maps.

    Original logits: ``F.mean((2, 3)) @ weight.T + bias``. Decomposed logits: ``sum_i mean_hw(F . p~_{c,i}) + b_c``
    (the sum of the prototype contributions plus the head's bias). Both come from the same feature maps, so any
    difference is the decomposition's.

    Args:
        features_module: images ``[B, 3, S, S]`` (normalised) -> feature maps ``[B, D, h, w]``, in eval mode; or None
            when ``loader_or_dataset`` holds precomputed feature maps.
        weight: ``[C, D]`` the original linear head; bias: ``[C]`` or None (zeros).
        head: the :class:`PartPrototypeHead` (C classes, D channels).
        loader_or_dataset: a dataset following :mod:`phpn_core.data.base`'s contract (images in [0, 1], normalised
            here with ``mean``/``std``, default the dataset's), a DataLoader/iterable of ``(images, labels)`` or
            ``{"image", "label"}`` batches (images in [0, 1]); or, with ``features_module=None``, a tuple
            ``(fmaps [N, D, h, w], labels [N])`` or an iterable of such batches.
        device: where to compute (default: the features module's device).
        batch_size: images per batch for datasets and precomputed tensors.

    Returns:
        ``{"accuracy_original", "accuracy_decomposed"}`` (fractions in [0, 1]), ``"max_abs_logit_diff"``,
        ``"prediction_agreement"`` (fraction of images with the same argmax), ``"n_images"``.
    """
    who = "accuracy_parity"
    _require_pos_int("batch_size", batch_size, "e.g. batch_size=64")
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"{who}: head must be a PartPrototypeHead; got {type(head).__name__}.")
    C, k, D = head.prototypes.shape
    _require_tensor(f"{who}: weight", weight, 2, "[C, D]")
    if tuple(weight.shape) != (C, D):
        raise ShapeError(f"{who}: weight must have shape [C={C}, D={D}] like the head; got {_desc(weight)}.")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C,)):
        raise ShapeError(f"{who}: bias must have shape [C={C}] or be None; got {_desc(bias)}.")
    if features_module is not None:
        _check_eval_mode(features_module, who)
    dev = _module_device(features_module, device)
    dtype = head.prototypes.dtype
    W = weight.detach().to(dev, dtype)
    b = (bias.detach() if bias is not None else torch.zeros(C)).to(dev, dtype)
    protos, hbias = head.prototypes.detach().to(dev), head.bias.detach().to(dev)
    n = correct_o = correct_d = agree = 0
    max_diff = 0.0
    with torch.no_grad():
        for fmap, labels in _feature_batches(features_module, loader_or_dataset, batch_size=batch_size, mean=mean,
                                             std=std, device=dev, who=who):
            if fmap.shape[1] != D:
                raise ShapeError(f"{who}: feature maps have D={fmap.shape[1]} channels, the head D={D}; got "
                                 f"{_desc(fmap)} (expected [B, D, h, w], channels first).")
            pooled = fmap.to(dtype).mean((2, 3))  # [B, D]
            orig = pooled @ W.T + b
            dec = torch.einsum("bd,ckd->bck", pooled, protos).sum(-1) + hbias
            labels = labels.long()
            po, pd = orig.argmax(1), dec.argmax(1)
            correct_o += int((po == labels).sum())
            correct_d += int((pd == labels).sum())
            agree += int((po == pd).sum())
            max_diff = max(max_diff, float((orig - dec).abs().max()) if orig.numel() else 0.0)
            n += labels.shape[0]
    if n == 0:
        raise InputValueError(f"{who}: no images; expected a non-empty dataset or loader.")
    return {
        "accuracy_original": correct_o / n, "accuracy_decomposed": correct_d / n,
        "max_abs_logit_diff": max_diff, "prediction_agreement": agree / n, "n_images": n,
    }


def head_reconstruction_error(head: PartPrototypeHead, weight: torch.Tensor) -> float:
    """``max_{c,d} |sum_i p~_{c,i,d} - v_{c,d}|`` for prototypes ``[C, k, D]`` and ``weight [C, D]``."""
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"head_reconstruction_error: head must be a PartPrototypeHead; got {type(head).__name__}.")
    _require_tensor("head_reconstruction_error: weight", weight, 2, "[C, D]")
    C, _, D = head.prototypes.shape
    if tuple(weight.shape) != (C, D):
        raise ShapeError(f"head_reconstruction_error: weight must have shape [C={C}, D={D}]; got {_desc(weight)}.")
    w = weight.detach().to(head.prototypes.device, head.prototypes.dtype)
    return float((head.prototypes.sum(1) - w).abs().max())


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
    r, c = peaks[..., 0:1].double(), peaks[..., 1:2].double()  # [N, k, 1]
    y1, y2 = (r - hy).clamp_min(0), (r + hy).clamp_max(H)
    x1, x2 = (c - hx).clamp_min(0), (c + hx).clamp_max(W)
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


def consistency(covered: torch.Tensor, visible: torch.Tensor, *, threshold: float = 0.8) -> ConsistencyResult:
    """ProtoEval consistency of one class's k prototypes over its N images.

    Args:
        covered: ``[N, k, P]`` bool, from :func:`part_coverage`.
        visible: ``[N, P]`` bool (or {0, 1}), part p visible on image n.
        threshold: a prototype is consistent when some part's rate is ``>= threshold`` (ProtoEval: 0.8).

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
        score=float(per.double().mean() * 100), per_prototype=per.cpu(), per_prototype_part_rate=rate.cpu(),
        best_part=rate.argmax(-1).cpu() if P else torch.zeros(k, dtype=torch.long), visible_count=vis_count.cpu(),
        threshold=float(threshold),
    )


def stability(covered_clean: torch.Tensor, covered_noisy: torch.Tensor) -> StabilityResult:
    """ProtoEval stability of one class's k prototypes: ``covered_clean``/``covered_noisy`` ``[N, k, P]`` bool.

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
    return StabilityResult(score=float(per.mean() * 100), per_prototype=per.cpu())


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


def _load_batch(dataset, indices: Sequence[int], who: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def _class_indices(dataset, classes, n_classes: int, who: str) -> tuple[list[int], dict[int, list[int]]]:
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


def _noise_like(x: torch.Tensor, indices: Sequence[int], *, seed: int, noise_std: float, noise_clip: float
                ) -> torch.Tensor:
    """``clip(N(0, noise_std), -noise_clip, noise_clip)`` shaped like ``x [B, ...]``; image i seeded by its index."""
    g = torch.Generator(device="cpu")
    rows = []
    for i in indices:
        g.manual_seed((seed * _NOISE_SEED_STRIDE + int(i)) % (1 << 63))
        rows.append(torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32))
    noise = torch.stack(rows) * noise_std
    return noise.clamp(-noise_clip, noise_clip).to(x.device, x.dtype)


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
    classes, by_class = _class_indices(dataset, classes, C, who)

    def coverage(x: torch.Tensor, c: int, kps: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = features_module(x).to(dtype)
        ex = ev_head.explain(fmap, classes=[c])
        maps = (ex.oriented_heatmaps if use_oriented else ex.heatmaps)[:, 0]  # [B, k, h, w]
        peaks = peak_locations(maps, image_size=size, upsample=upsample)  # [B, k, 2]
        hy, hx = box_half_size_px(size, box_half_size=box_half_size, box_reference_size=box_reference_size)
        cov = _covered_from_peaks(peaks, kps, size[0], size[1], hy, hx)
        return cov.cpu(), peaks.cpu()

    per_class: list[ClassProtoEval] = []
    sizes: set = set()
    with torch.no_grad():
        for c in classes:
            idx = by_class[c]
            covs, covs_noisy, vis, peaks = [], [], [], []
            for s in range(0, len(idx), batch_size):
                bidx = idx[s : s + batch_size]
                images, kps = _load_batch(dataset, bidx, who)
                size = tuple(images.shape[-2:])
                sizes.add(size)
                x = normalize(images, mean, std).to(dev)
                cov, pk = coverage(x, c, kps, size)
                noisy = x + _noise_like(x, bidx, seed=seed, noise_std=noise_std, noise_clip=noise_clip)
                cov_n, _ = coverage(noisy, c, kps, size)
                covs.append(cov)
                covs_noisy.append(cov_n)
                vis.append(kps[..., 2] > 0.5)
                peaks.append(pk)
            covered, covered_noisy, visible = torch.cat(covs), torch.cat(covs_noisy), torch.cat(vis)
            per_class.append(ClassProtoEval(
                class_index=c, image_indices=list(idx), covered=covered, covered_noisy=covered_noisy,
                visible=visible, peaks=torch.cat(peaks),
                consistency=consistency(covered, visible, threshold=threshold),
                stability=stability(covered, covered_noisy),
            ))
    consistent = torch.stack([r.consistency.per_prototype for r in per_class])
    stable = torch.stack([r.stability.per_prototype for r in per_class])
    part_rate = torch.stack([r.consistency.per_prototype_part_rate for r in per_class])
    size_list = sorted(sizes)
    return ProtoEvalResult(
        consistency=float(consistent.double().mean() * 100), stability=float(stable.mean() * 100),
        classes=classes, consistent=consistent, part_rate=part_rate, stable_fraction=stable, per_class=per_class,
        settings={
            "threshold": float(threshold), "noise_std": noise_std, "noise_clip": noise_clip, "seed": seed,
            "box_half_size": float(box_half_size), "box_reference_size": box_reference_size,
            "box_half_size_px": [list(box_half_size_px(s, box_half_size=box_half_size,
                                                        box_reference_size=box_reference_size)) for s in size_list],
            "image_size": [list(s) for s in size_list], "upsample": upsample, "use_oriented": bool(use_oriented),
            "prototypes": "override" if prototypes_override is not None else "head",
        },
    )


# ================================================================================================ faithfulness axioms

def _check_fmap_for(head: PartPrototypeHead, fmap: torch.Tensor, who: str) -> None:
    if not isinstance(head, PartPrototypeHead):
        raise TypeError(f"{who}: head must be a PartPrototypeHead; got {type(head).__name__}.")
    _require_tensor(f"{who}: fmap", fmap, 4, "[B, D, H, W]")
    if fmap.shape[1] != head.prototypes.shape[2]:
        raise ShapeError(f"{who}: fmap has D={fmap.shape[1]} channels, the head D={head.prototypes.shape[2]}; got "
                         f"{_desc(fmap)} (expected [B, D, H, W], channels first).")


def _model_logits(prototypes: torch.Tensor, bias: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
    """The decomposed model's logits ``[B, C]`` (ground truth for the axioms, independent of any ``explain``)."""
    return PartPrototypeHead(prototypes, bias)(fmap)


def completeness_error(explanation: Explanation, *, logits: torch.Tensor | None = None,
                       include_heatmaps: bool = True) -> float:
    """Completeness: ``max |contributions.sum(-1) + bias - logits|`` over images and classes.

    Args:
        explanation: an :class:`~phpn_core.head.Explanation` (contributions ``[B, C, k]``, bias ``[C]``,
            logits ``[B, C]``, heatmaps ``[B, C, k, H, W]``).
        logits: ``[B, C]`` the model's logits to explain (default: ``explanation.logits``). Pass the original
            model's logits to test the explanation against the model rather than against itself.
        include_heatmaps: also take the max with ``|heatmaps.mean((-2, -1)) - contributions|`` (the "where" maps
            add up to the "what").

    Returns:
        The largest deviation (0 up to float rounding for a complete explanation).
    """
    if not isinstance(explanation, Explanation):
        raise TypeError(f"completeness_error: expected an Explanation; got {type(explanation).__name__}.")
    contrib, bias = explanation.contributions, explanation.bias
    target = explanation.logits if logits is None else logits
    _require_tensor("completeness_error: contributions", contrib, 3, "[B, C, k]")
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(contrib.shape[:2]):
        raise ShapeError(f"completeness_error: logits must have shape [B, C]={tuple(contrib.shape[:2])}; got "
                         f"{_desc(target)}.")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (contrib.shape[1],):
        raise ShapeError(f"completeness_error: bias must have shape [C={contrib.shape[1]}]; got {_desc(bias)}.")
    err = float((contrib.sum(-1) + bias - target.to(contrib)).abs().max()) if contrib.numel() else 0.0
    if include_heatmaps:
        hm = explanation.heatmaps
        if not isinstance(hm, torch.Tensor) or hm.ndim != 5 or tuple(hm.shape[:3]) != tuple(contrib.shape):
            raise ShapeError(f"completeness_error: heatmaps must have shape [B, C, k, H, W] with [B, C, k]="
                             f"{tuple(contrib.shape)}; got {_desc(hm)}.")
        if hm.numel():
            err = max(err, float((hm.mean((-2, -1)) - contrib).abs().max()))
    return err


def sensitivity_check(head: PartPrototypeHead, fmap: torch.Tensor) -> float:
    """Sensitivity: removing (zeroing) prototype i of every class changes each logit by exactly its contribution.

    For each i, the model's logits with and without prototype i (computed by the plain decomposed model, not by
    ``head.explain``) differ by ``delta [B, C]``; the explanation's ``contributions[:, :, i]`` must equal it. In
    particular a prototype with zero contribution changes nothing.

    Args:
        head: the head whose ``explain`` is checked (``[C, k, D]``); fmap: ``[B, D, H, W]``.

    Returns:
        ``max_{b,c,i} |delta_i - contributions[:, :, i]|``.
    """
    _check_fmap_for(head, fmap, "sensitivity_check")
    with torch.no_grad():
        ex = head.explain(fmap)
        protos, bias = head.prototypes, head.bias
        full = _model_logits(protos, bias, fmap)
        dev = 0.0
        for i in range(protos.shape[1]):
            removed = protos.clone()
            removed[:, i] = 0
            delta = full - _model_logits(removed, bias, fmap)
            dev = max(dev, float((delta - ex.contributions[:, :, i]).abs().max()))
    return dev


def linearity_check(head_a: PartPrototypeHead, head_b: PartPrototypeHead, fmap: torch.Tensor,
                    a: float, b: float) -> float:
    """Linearity: the explanation of ``a * head_a + b * head_b`` is ``a * expl_a + b * expl_b``.

    The combined head has prototypes ``a P_a + b P_b`` and bias ``a b_a + b b_b`` and is built as
    ``type(head_a)(prototypes, bias)`` (both heads must be of one type, so that the same explanation method is
    checked). Compared: contributions ``[B, C, k]`` and raw heatmaps ``[B, C, k, H, W]``.

    Returns:
        The largest absolute deviation.
    """
    _check_fmap_for(head_a, fmap, "linearity_check")
    _check_fmap_for(head_b, fmap, "linearity_check")
    if type(head_a) is not type(head_b):
        raise TypeError(f"linearity_check: head_a and head_b must be of one type; got {type(head_a).__name__} and "
                        f"{type(head_b).__name__}.")
    if head_a.prototypes.shape != head_b.prototypes.shape:
        raise ShapeError(f"linearity_check: heads must have the same [C, k, D]; got {tuple(head_a.prototypes.shape)} "
                         f"and {tuple(head_b.prototypes.shape)}.")
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputValueError(f"linearity_check: {name} must be a finite number; got {v!r}.")
    with torch.no_grad():
        combined = type(head_a)(a * head_a.prototypes + b * head_b.prototypes, a * head_a.bias + b * head_b.bias)
        ea, eb, eab = head_a.explain(fmap), head_b.explain(fmap), combined.explain(fmap)
        dc = (eab.contributions - (a * ea.contributions + b * eb.contributions)).abs().max()
        dh = (eab.heatmaps - (a * ea.heatmaps + b * eb.heatmaps)).abs().max()
    return float(torch.maximum(dc, dh))


def channel_attributions(head: PartPrototypeHead, fmap: torch.Tensor, *,
                         classes: list[int] | None = None) -> torch.Tensor:
    """Per-channel attribution of each prototype's contribution: ``mean_hw(F[:, d]) * p~[c, i, d]``.

    Args:
        head: ``[C, k, D]``; fmap: ``[B, D, H, W]``; classes: optional subset of classes (C' of them).

    Returns:
        ``[B, C', k, D]``; summing over D gives the contributions ``[B, C', k]``.
    """
    _check_fmap_for(head, fmap, "channel_attributions")
    protos = head.prototypes
    if classes is not None:
        idx = torch.as_tensor(classes, dtype=torch.long, device=protos.device)
        if idx.ndim != 1 or bool(((idx < 0) | (idx >= protos.shape[0])).any()):
            raise InputValueError(
                f"channel_attributions: classes must be ints in [0, {protos.shape[0]}); got {classes}."
            )
        protos = protos[idx]
    pooled = fmap.mean((2, 3))  # [B, D]
    return pooled[:, None, None, :] * protos[None]


def symmetry_check(head: PartPrototypeHead, fmap: torch.Tensor, i: int, j: int, *, attribution=channel_attributions,
                   atol: float = 1e-6) -> float:
    """Symmetry preservation: identical channels i and j with equal prototype weights get identical attributions.

    Args:
        head: ``[C, k, D]``; fmap: ``[B, D, H, W]`` with ``fmap[:, i] == fmap[:, j]``.
        i, j: the two channels; the prototypes must satisfy ``p~[..., i] == p~[..., j]``.
        attribution: ``(head, fmap) -> [B, C, k, D]`` the per-channel attribution checked
            (default :func:`channel_attributions`).
        atol: tolerance of the premise check.

    Returns:
        ``max |attr[..., i] - attr[..., j]|``.

    Raises:
        InputValueError: the premise does not hold (the channels or the prototype weights differ by more than
            ``atol``): the axiom says nothing then. Fix: copy channel i onto j in both.
    """
    _check_fmap_for(head, fmap, "symmetry_check")
    D = fmap.shape[1]
    for name, v in (("i", i), ("j", j)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < D:
            raise InputValueError(f"symmetry_check: {name} must be a channel index in [0, {D}); got {v!r}.")
    if not torch.allclose(fmap[:, i], fmap[:, j], rtol=0, atol=atol):
        raise InputValueError(
            f"symmetry_check: channels {i} and {j} of fmap differ (max |diff| "
            f"{float((fmap[:, i] - fmap[:, j]).abs().max()):.3g} > atol={atol}); the axiom needs identical channels. "
            f"Fix: fmap[:, {j}] = fmap[:, {i}]."
        )
    P = head.prototypes
    if not torch.allclose(P[..., i], P[..., j], rtol=0, atol=atol):
        raise InputValueError(
            f"symmetry_check: the prototypes' weights on channels {i} and {j} differ (max |diff| "
            f"{float((P[..., i] - P[..., j]).abs().max()):.3g} > atol={atol}); the axiom needs equal weights."
        )
    with torch.no_grad():
        attr = attribution(head, fmap)
    B, C, k = fmap.shape[0], P.shape[0], P.shape[1]
    if not isinstance(attr, torch.Tensor) or tuple(attr.shape) != (B, C, k, D):
        raise ShapeError(f"symmetry_check: attribution must return [B, C, k, D]={(B, C, k, D)}; got {_desc(attr)}.")
    return float((attr[..., i] - attr[..., j]).abs().max())
