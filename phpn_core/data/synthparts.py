"""SynthParts: a synthetic planted-parts dataset with known part locations.

Every class is a fixed conjunction of ``parts_per_class`` part types drawn from a pool of distinct shapes and
textures; one extra *distractor* part type appears in every image of every class, so it carries no class
information. Parts sit at random non-overlapping positions on a random textured background, with slight jitter in
size and colour; a class part is occasionally omitted (its keypoint is then invisible). Because the generator knows
where it drew every part, the dataset gives exact keypoints (and, through :meth:`SynthParts.part_masks`, exact part
masks), which is what the interpretability metrics (consistency, stability) need.

Determinism: image ``i`` of split ``s`` is drawn from its own generator seeded by ``(seed, s, i)``, so the same
seed gives bit-identical tensors whatever the order of access or the number of DataLoader workers. The class
definitions (``class_parts``) depend only on ``n_classes`` and ``parts_per_class``, not on ``seed``: a train split
and a test split built with different seeds still describe the same classes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from phpn_core.errors import InputValueError

from .base import Sample

__all__ = ["SynthParts", "PART_TYPES", "MIN_IMAGE_SIZE", "MAX_PART_VARIANTS"]


@dataclass(frozen=True)
class _PartType:
    name: str
    shape: str  # key into _shape_mask / _shape_pattern
    colour: tuple[float, float, float]
    colour2: tuple[float, float, float] | None = None  # second colour of two-colour parts (textures, target)


# The pool. Colours are chosen to be pairwise distinct; the distractor (last) is near-white so that it is as salient
# as any class part and a model cannot ignore it by colour alone.
_POOL: tuple[_PartType, ...] = (
    _PartType("circle", "circle", (0.90, 0.10, 0.10)),
    _PartType("square", "square", (0.10, 0.20, 0.90)),
    _PartType("triangle", "triangle", (0.95, 0.85, 0.10)),
    _PartType("x_cross", "x_cross", (0.10, 0.75, 0.20)),
    _PartType("plus", "plus", (0.90, 0.10, 0.80)),
    _PartType("target", "target", (1.00, 0.55, 0.00), (0.05, 0.05, 0.05)),
    _PartType("h_stripes", "h_stripes", (0.55, 0.10, 0.75), (0.95, 0.95, 0.95)),
    _PartType("v_stripes", "v_stripes", (0.00, 0.80, 0.85), (0.05, 0.05, 0.05)),
    _PartType("checker", "checker", (0.95, 0.95, 0.95), (0.05, 0.05, 0.05)),
    _PartType("dots", "dots", (0.65, 1.00, 0.20), (0.05, 0.30, 0.10)),
    _PartType("ellipse", "ellipse", (0.55, 0.30, 0.10)),
    _PartType("diamond", "diamond", (0.97, 0.97, 0.97)),
)
PART_TYPES: tuple[str, ...] = tuple(p.name for p in _POOL)
"""Names of the part types in the pool, in keypoint-row order; the last one is the distractor."""

# Colour variants for more classes than the base pool's part sets allow: variant v (2, 3) of class part type j has
# j's shape (and second colour) with the first colour of type (j + shift) mod 11. The shifts keep every two-colour
# part's colours apart and every (shape, colour) pair distinct from the base pool's.
_VARIANT_SHIFTS = (5, 3)
MAX_PART_VARIANTS = 1 + len(_VARIANT_SHIFTS)
"""Largest ``part_variants`` of :class:`SynthParts`."""

_DISTRACTOR = len(_POOL) - 1
_N_CLASS_PART_TYPES = len(_POOL) - 1  # the distractor is never a class part


@functools.lru_cache(maxsize=8)
def _variant_pool(part_variants: int) -> tuple[_PartType, ...]:
    """The pool with ``part_variants - 1`` colour variants of every class part type, the distractor last."""
    base = _POOL[:_N_CLASS_PART_TYPES]
    pool = list(base)
    for v, shift in enumerate(_VARIANT_SHIFTS[: part_variants - 1], start=2):
        for j, pt in enumerate(base):
            donor = base[(j + shift) % len(base)]
            pool.append(_PartType(f"{pt.name}_v{v}", pt.shape, donor.colour, pt.colour2))
    return (*pool, _POOL[_DISTRACTOR])

MIN_IMAGE_SIZE = 48
"""Smallest supported ``image_size``: below it parts are a few pixels wide and shapes become indistinguishable."""

_SPLITS = {"train": 0, "test": 1}
_DEFAULT_N_PER_CLASS = {"train": 50, "test": 20}
_DESIGN_SEED = 20240521  # fixes class_parts for given (n_classes, parts_per_class), independent of the data seed

_PART_FRAC = 0.15  # nominal part size as a fraction of image_size (about 17 px at 112 px)
_SIZE_JITTER = 0.15  # part size varies by +-15 %
_COLOUR_JITTER = 0.06  # per-channel colour jitter of parts
_GAP = 2  # minimum gap in pixels between two parts' bounding boxes


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask of a part in normalised coordinates ``u [1, w]``, ``v [h, 1]`` (the part spans ``[-1, 1]``).

    Returns ``(mask, pattern)``: ``mask`` bool ``[h, w]`` (where the part is), ``pattern`` bool ``[h, w]`` or None
    (where the second colour is used, for two-colour parts). Every mask covers the centre ``(0, 0)`` so the
    keypoint always lies on the drawn part.
    """
    au, av = np.abs(u), np.abs(v)
    box = (au <= 0.9) & (av <= 0.9)
    if shape == "circle":
        return u * u + v * v <= 0.95, None
    if shape == "square":
        return (au <= 0.8) & (av <= 0.8), None
    if shape == "triangle":  # apex up (image y grows downwards)
        return (v >= -0.85) & (v <= 0.85) & (au <= (v + 0.85) / 1.7 * 0.95), None
    if shape == "x_cross":
        return box & ((np.abs(u - v) < 0.4) | (np.abs(u + v) < 0.4)), None
    if shape == "plus":
        return box & ((au < 0.35) | (av < 0.35)), None
    if shape == "target":  # coloured ring around a dark bullseye
        r2 = u * u + v * v
        return r2 <= 0.95, r2 <= 0.2
    if shape == "h_stripes":
        return box, np.sin(v * (2.5 * math.pi)) > 0
    if shape == "v_stripes":
        return box, np.sin(u * (2.5 * math.pi)) > 0
    if shape == "checker":
        return box, ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2) == 0
    if shape == "dots":  # light dots on a dark square
        du = u * 1.5 - np.round(u * 1.5)
        dv = v * 1.5 - np.round(v * 1.5)
        return box, du * du + dv * dv > 0.09
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 0.95, None
    if shape == "diamond":
        return au + av <= 1.0, None
    raise InputValueError(f"unknown part shape {shape!r} (internal pool definition); expected one of {PART_TYPES}")


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix ``[n_out, n_in]`` (align_corners=False), so ``A @ x @ A.T`` upsamples ``x``."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    a = np.zeros((n_out, n_in))
    a[np.arange(n_out), lo] += 1 - w
    a[np.arange(n_out), hi] += w
    return a


def _design_class_parts(n_classes: int, parts_per_class: int, n_types: int = _N_CLASS_PART_TYPES) -> list[list[int]]:
    """A fresh copy of :func:`_design_class_parts_cached` (callers may mutate it)."""
    return [list(c) for c in _design_class_parts_cached(n_classes, parts_per_class, n_types)]


@functools.lru_cache(maxsize=64)
def _design_class_parts_cached(n_classes: int, parts_per_class: int,
                               n_types: int = _N_CLASS_PART_TYPES) -> tuple[tuple[int, ...], ...]:
    """Deterministic class definitions: unique part sets that spread the pool evenly and overlap as little as possible.

    Greedy: each class takes the unused combination with the smallest (largest overlap with an earlier class, total
    use of its part types), ties broken by a fixed-seed random order. Because the pool is small, several classes
    share part types as soon as ``n_classes * parts_per_class`` exceeds the pool.
    """
    rng = np.random.default_rng(_DESIGN_SEED + 1000 * parts_per_class)
    combos = list(itertools.combinations(range(n_types), parts_per_class))
    order = rng.permutation(len(combos))
    combos = [frozenset(combos[i]) for i in order]
    usage = [0] * n_types
    overlap = [0] * len(combos)  # largest overlap of each combination with the classes chosen so far
    free = [True] * len(combos)
    chosen: list[frozenset[int]] = []
    for _ in range(n_classes):
        best, best_key = -1, None
        for j, c in enumerate(combos):
            if not free[j]:
                continue
            key = (overlap[j], sum(usage[i] for i in c))
            if best_key is None or key < best_key:
                best, best_key = j, key
                if key == (0, 0):
                    break
        if best < 0:  # unreachable after SynthParts' n_classes <= C(pool, k) check
            raise InputValueError(f"cannot design {n_classes} distinct classes of {parts_per_class} parts")
        b = combos[best]
        free[best] = False
        chosen.append(b)
        for i in b:
            usage[i] += 1
        overlap = [max(o, len(c & b)) for o, c in zip(overlap, combos)]
    return tuple(tuple(sorted(c)) for c in chosen)


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # SeedSequence mixes the three numbers well, so neighbouring indices or seeds give unrelated streams.
    # Drawing is done in numpy on purpose: its elementwise ops are single-threaded, whereas torch's OpenMP threads
    # slow small ops down 100x when the cores are shared (measured: 7 ms instead of 35 us per 3x112x112 op).
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLITS[split], index])))


def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputValueError(f"{name} must be an int, got {type(value).__name__} {value!r}; {hint}")
    if value < minimum:
        raise InputValueError(f"{name} must be >= {minimum}, got {value}; {hint}")
    return int(value)


class SynthParts(Dataset):
    """Synthetic planted-parts images with exact keypoints (see the module docstring).

    Args:
        split: ``"train"`` or ``"test"``; the two splits draw from disjoint per-image seeds.
        n_classes: number of classes ``C`` (>= 1, at most the number of distinct part sets).
        n_per_class: images per class; default 50 for train and 20 for test.
        image_size: side ``S`` of the square images in pixels (>= :data:`MIN_IMAGE_SIZE`); parts scale with it.
        parts_per_class: class parts per image, ``1 .. len(PART_TYPES) - 1`` (the distractor comes on top).
        seed: data seed (>= 0); the same seed gives identical tensors.
        part_variants: ``1`` (default) the base pool of :data:`PART_TYPES`; ``2`` or ``3`` add that many minus one
            colour variants of every class part type (``"circle_v2"``: a circle in another part's colour), for more
            classes than the base pool's part sets allow (165 of 3 parts; 1540 with ``part_variants=2``). The
            distractor stays the last part type.
        omit_prob: probability that a class part is left out of an image. An omission is only kept when the
            remaining class parts still identify the class (are not a subset of another class's parts), so every
            image stays classifiable. The distractor is never omitted.

    Items are :class:`~phpn_core.data.base.Sample` dicts: ``image`` float32 ``[3, S, S]`` in ``[0, 1]``, ``label``
    int, ``image_id`` str, ``keypoints`` float32 ``[P, 3]`` with one row ``(x, y, visible)`` per part type of the
    pool (``P = len(part_names)``); ``(x, y)`` is the centre of the drawn part in pixel coordinates
    (``x`` = column, ``y`` = row), and rows of parts not drawn are ``(0, 0, 0)``.

    Attributes:
        classes: ``["class_00", ...]``, length ``C``.
        part_names: the pool's part-type names, distractor included (``P`` names).
        class_parts: ``list[list[int]]``, the part-type indices of each class (sorted, ``parts_per_class`` each).
        distractor: index of the distractor part type in ``part_names``.
        mean, std: ``(0.5, 0.5, 0.5)`` each.
        labels: label of every item, in item order (items are class-contiguous).
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(
        self,
        *,
        split: str = "train",
        n_classes: int = 8,
        n_per_class: int | None = None,
        image_size: int = 112,
        parts_per_class: int = 3,
        seed: int = 0,
        omit_prob: float = 0.1,
        part_variants: int = 1,
    ) -> None:
        if split not in _SPLITS:
            raise InputValueError(
                f"split must be one of {sorted(_SPLITS)}, got {split!r}; pass split='train' or split='test'"
            )
        n_classes = _check_int("n_classes", n_classes, 1, "pass n_classes=1 or more (default 8)")
        if n_per_class is None:
            n_per_class = _DEFAULT_N_PER_CLASS[split]
        n_per_class = _check_int("n_per_class", n_per_class, 1, "pass n_per_class=1 or more, or None for the default")
        image_size = _check_int(
            "image_size", image_size, MIN_IMAGE_SIZE,
            f"parts would be too small to draw; use image_size >= {MIN_IMAGE_SIZE} (default 112)",
        )
        parts_per_class = _check_int(
            "parts_per_class", parts_per_class, 1, "pass parts_per_class=1 or more (default 3)"
        )
        part_variants = _check_int("part_variants", part_variants, 1, "pass part_variants=1 (the base pool) or more")
        if part_variants > MAX_PART_VARIANTS:
            raise InputValueError(f"part_variants must be <= {MAX_PART_VARIANTS}, got {part_variants}; use a smaller "
                                  f"part_variants")
        pool = _variant_pool(part_variants)
        n_types = len(pool) - 1
        if parts_per_class > n_types:
            raise InputValueError(
                f"parts_per_class must be <= {n_types} (the pool has {len(pool)} part types, one of them "
                f"the distractor), got {parts_per_class}; use a smaller parts_per_class"
            )
        n_sets = math.comb(n_types, parts_per_class)
        if n_classes > n_sets:
            more = (f" or part_variants={part_variants + 1} (colour variants of every part type)"
                    if part_variants < MAX_PART_VARIANTS else "")
            raise InputValueError(
                f"n_classes={n_classes} needs that many distinct sets of {parts_per_class} part types, but the pool of "
                f"{n_types} class part types allows only {n_sets}; use n_classes <= {n_sets}, a "
                f"parts_per_class closer to {n_types // 2}{more}"
            )
        _check_int("seed", seed, 0, "pass a non-negative int seed")
        if isinstance(omit_prob, bool) or not isinstance(omit_prob, (int, float)) or not 0.0 <= omit_prob < 1.0:
            raise InputValueError(f"omit_prob must be a float in [0, 1), got {omit_prob!r}; e.g. omit_prob=0.1")

        self.split = split
        self.n_classes = n_classes
        self.n_per_class = n_per_class
        self.image_size = image_size
        self.parts_per_class = parts_per_class
        self.seed = int(seed)
        self.omit_prob = float(omit_prob)
        self.part_variants = part_variants
        self._pool = pool

        self.classes = [f"class_{c:02d}" for c in range(n_classes)]
        self.part_names = [pt.name for pt in pool]
        self.class_parts = _design_class_parts(n_classes, parts_per_class, n_types)
        self.distractor = len(pool) - 1
        self.labels = [i // n_per_class for i in range(n_classes * n_per_class)]

        # Geometry: nominal part size and the grid used as a guaranteed fallback placement.
        self._base_size = max(6.0, _PART_FRAC * image_size)
        self._max_half = self._base_size * (1 + _SIZE_JITTER) / 2
        self._cell = int(math.ceil(2 * self._max_half)) + _GAP + 1
        grid = image_size // self._cell
        if grid * grid < parts_per_class + 1:  # cannot happen for image_size >= MIN_IMAGE_SIZE; kept as a guard
            raise InputValueError(
                f"image_size={image_size} cannot hold {parts_per_class + 1} non-overlapping parts; "
                f"use a larger image_size or a smaller parts_per_class"
            )
        self._upsample = _interp_matrix(image_size, 4).astype(np.float32)  # smooth background blobs from a 4x4 grid
        self._ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
        self._class_sets = [frozenset(p) for p in self.class_parts]
        self._identifiable: dict[tuple[int, frozenset[int]], bool] = {}

    def __len__(self) -> int:
        return self.n_classes * self.n_per_class

    def __getitem__(self, index: int) -> Sample:
        index = self._check_index(index)
        image, keypoints, _ = self._render(index, with_masks=False)
        return {
            "image": image,
            "label": self.labels[index],
            "image_id": self.image_id(index),
            "keypoints": keypoints,
        }

    def image_id(self, index: int) -> str:
        """Stable unique id of item ``index``, e.g. ``"train-s0-c03-00157"``."""
        index = self._check_index(index)
        return f"{self.split}-s{self.seed}-c{self.labels[index]:02d}-{index:05d}"

    def part_masks(self, index: int) -> torch.Tensor:
        """Exact masks of the parts drawn in item ``index``: bool ``[P, S, S]`` (all False for parts not drawn).

        Masks of different parts never overlap. Rendering is repeated, so this costs as much as one item.
        """
        _, _, masks = self._render(self._check_index(index), with_masks=True)
        return masks

    def __repr__(self) -> str:
        return (
            f"SynthParts(split={self.split!r}, n_classes={self.n_classes}, n_per_class={self.n_per_class}, "
            f"image_size={self.image_size}, parts_per_class={self.parts_per_class}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ internals

    def _check_index(self, index) -> int:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise InputValueError(f"index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a SynthParts of {n} items (valid: 0..{n - 1})")
        return int(index) % n

    def _is_identifiable(self, label: int, shown: frozenset[int]) -> bool:
        """Whether class ``label`` is the only class whose parts include ``shown``."""
        key = (label, shown)
        if key not in self._identifiable:
            self._identifiable[key] = bool(shown) and not any(
                shown <= s for c, s in enumerate(self._class_sets) if c != label
            )
        return self._identifiable[key]

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Muted random texture float32 ``[3, S, S]``: smooth colour blobs + a linear gradient + fine noise."""
        S = self.image_size
        coarse = rng.random((3, 4, 4), dtype=np.float32)
        # Low saturation: mix each channel with the grey mean, so saturated parts stand out. Done on the 4x4 grid:
        # the upsampling is linear and its rows sum to 1, so mixing and the affine map commute with it.
        coarse = 0.2 + 0.6 * (0.4 * coarse + 0.6 * coarse.mean(0, keepdims=True))
        blobs = self._upsample @ coarse @ self._upsample.T  # [3, S, S]
        angle = rng.random() * (2 * math.pi)
        grad = (0.12 * math.cos(angle)) * self._ramp[None, :] + (0.12 * math.sin(angle)) * self._ramp[:, None]
        bg = blobs + grad + rng.standard_normal((3, S, S), dtype=np.float32) * np.float32(0.04)
        return np.clip(bg, 0.05, 0.95, out=bg)

    def _place(self, rng: np.random.Generator, halves: np.ndarray) -> np.ndarray:
        """Centres ``[n, 2]`` (x, y) of ``n`` parts of half-sizes ``halves [n]`` without overlap.

        Rejection sampling from a batch of candidates; if that fails (very crowded images), falls back to random
        cells of a grid, which always fits (checked in ``__init__``).
        """
        S, n = self.image_size, len(halves)
        n_cand = 32 * n
        lo = self._max_half + 1
        cand = (lo + rng.random((n_cand, 2)) * (S - 1 - 2 * lo)).tolist()
        h = halves.tolist()
        centres: list[list[float]] = []
        j = 0
        for i in range(n):
            while j < n_cand:
                x, y = cand[j]
                j += 1
                if all(max(abs(x - cx), abs(y - cy)) >= h[i] + h[k] + _GAP for k, (cx, cy) in enumerate(centres)):
                    centres.append([x, y])
                    break
            else:
                break
        if len(centres) == n:
            return np.asarray(centres)
        grid = S // self._cell
        cells = rng.permutation(grid * grid)[:n]
        offset = (S - grid * self._cell) / 2
        slack = np.maximum(self._cell - 2 * halves - _GAP, 0)  # room to jitter inside the cell
        jitter = rng.random((n, 2)) * slack[:, None]
        x = offset + (cells % grid) * self._cell + _GAP / 2 + halves + jitter[:, 0]
        y = offset + (cells // grid) * self._cell + _GAP / 2 + halves + jitter[:, 1]
        return np.stack([x, y], axis=1)

    def _render(self, index: int, *, with_masks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draw item ``index``: image ``[3, S, S]``, keypoints ``[P, 3]``, masks ``[P, S, S]`` bool or None."""
        S, P = self.image_size, len(self._pool)
        label = self.labels[index]
        rng = _image_rng(self.seed, self.split, index)

        # Which class parts are shown: omissions are accepted one by one only while the class stays identifiable.
        parts = self.class_parts[label]
        omit = (rng.random(len(parts)) < self.omit_prob).tolist()
        shown = set(parts)
        for p, o in zip(parts, omit):
            if o and self._is_identifiable(label, frozenset(shown - {p})):
                shown.discard(p)
        drawn = sorted(shown) + [self.distractor]

        image = self._background(rng)
        n = len(drawn)
        halves = self._base_size * (1 + _SIZE_JITTER * (2 * rng.random(n) - 1)) / 2
        centres = self._place(rng, halves)
        colour_jit = (2 * rng.random((n, 2, 3)) - 1) * _COLOUR_JITTER

        keypoints = np.zeros((P, 3), dtype=np.float32)
        masks = np.zeros((P, S, S), dtype=bool) if with_masks else None
        for k, p in enumerate(drawn):
            pt = self._pool[p]
            cx, cy, h = float(centres[k, 0]), float(centres[k, 1]), float(halves[k])
            # Only touch the part's bounding box: cheap, and parts never overlap.
            x0, x1 = max(0, math.floor(cx - h) - 1), min(S, math.ceil(cx + h) + 2)
            y0, y1 = max(0, math.floor(cy - h) - 1), min(S, math.ceil(cy + h) + 2)
            u = ((np.arange(x0, x1) - cx) / h)[None, :]
            v = ((np.arange(y0, y1) - cy) / h)[:, None]
            mask, pattern = _shape_mask(pt.shape, u, v)
            c1 = np.clip(np.asarray(pt.colour) + colour_jit[k, 0], 0, 1)[:, None, None]
            if pattern is None:
                fill = c1
            else:
                c2 = np.clip(np.asarray(pt.colour2) + colour_jit[k, 1], 0, 1)[:, None, None]
                fill = np.where(pattern, c2, c1)
            region = image[:, y0:y1, x0:x1]
            region[...] = np.where(mask, fill, region)  # a view: writes into image
            keypoints[p] = (cx, cy, 1.0)
            if masks is not None:
                masks[p, y0:y1, x0:x1] = mask
        return (
            torch.from_numpy(image),
            torch.from_numpy(keypoints),
            None if masks is None else torch.from_numpy(masks),
        )
