"""CUB-200-2011 from its original directory layout, with part keypoints in returned-image pixel coordinates.

Layout read (paths relative to ``root``; ids are 1-based, separated by single spaces)::

    images.txt               <image_id> <path under images/>
    image_class_labels.txt   <image_id> <class_id>
    train_test_split.txt     <image_id> <is_train: 1 train, 0 test>
    classes.txt              <class_id> <class name>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>        (floats; only with crop_to_bbox=True)
    parts/parts.txt          <part_id> <part name, may contain spaces>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>  (floats, pixel coords of the original image)
    images/<path>            the photos

Geometry follows ProtoEval (Huang et al., ICCV 2023, ``util/crop_cub_data.py`` and
``util/eval_interpretability.py``): the crop box is ``x0 = floor(x)``, ``y0 = floor(y)``,
``x1 = x0 + floor(w)``, ``y1 = y0 + floor(h)`` (half-open, clipped to the image), then a plain resize to ``S x S``.
A keypoint ``(x, y)`` maps to ``((x - x0) * S / (x1 - x0), (y - y0) * S / (y1 - y0))``; without a crop the box is
the whole image. ProtoEval truncates the mapped coordinates to ints; here they stay float (floor them to match).
A keypoint outside the half-open box ``[x0, x1) x [y0, y1)`` becomes invisible. Invisible rows are ``(0, 0, 0)``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from phpn_core.data.base import IMAGENET_MEAN, IMAGENET_STD, Sample
from phpn_core.data.images import (
    DEFAULT_MAX_PIXELS,
    check_image_size,
    check_max_pixels,
    check_on_error,
    find_unreadable,
    open_rgb,
    pil_to_tensor,
)
from phpn_core.errors import InputValueError

__all__ = ["CUB200"]

# What each metadata file must hold; used in error messages.
_LAYOUT = {
    "images.txt": "'<image_id> <relative path under images/>' per line",
    "image_class_labels.txt": "'<image_id> <class_id (1-based)>' per line",
    "train_test_split.txt": "'<image_id> <1 for train, 0 for test>' per line",
    "classes.txt": "'<class_id> <class name>' per line",
    "bounding_boxes.txt": "'<image_id> <x> <y> <width> <height>' per line",
    "parts/parts.txt": "'<part_id> <part name>' per line",
    "parts/part_locs.txt": "'<image_id> <part_id> <x> <y> <visible>' per line",
}


def _layout_hint() -> str:
    return "; ".join(f"{name}: {desc}" for name, desc in _LAYOUT.items()) + "; images under images/"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputValueError(f"CUB metadata file '{path}' is not UTF-8 text ({e}). Expected "
                              f"{_LAYOUT.get(_rel(path), 'a text file')}. Re-extract CUB_200_2011.tgz.") from e


def _rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name == "parts" else path.name


def _read_id_name(path: Path) -> list[tuple[int, str]]:
    """Lines '<int id> <string>' -> [(id, string)]; the string may contain spaces."""
    out = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(maxsplit=1)
        try:
            if len(fields) != 2:
                raise ValueError
            out.append((int(fields[0]), fields[1].strip()))
        except ValueError:
            raise InputValueError(
                f"{path}:{lineno}: expected {_LAYOUT[_rel(path)]}, got {line!r}. Fix or re-extract the file."
            ) from None
    return out


def _read_numeric(path: Path, ncols: int) -> np.ndarray:
    """Whitespace-separated numbers, ``ncols`` per line -> float64 array ``[n, ncols]``."""
    text = _read_text(path)
    if not text.strip():
        return np.zeros((0, ncols), dtype=np.float64)
    try:  # numpy's C parser: ~0.2 s for part_locs.txt's ~177k lines; rejects ragged rows
        arr = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2)
        if arr.shape[1] == ncols and np.isfinite(arr).all():
            return arr
    except ValueError:
        pass
    # Slow path only to point at the first bad line.
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        ok = len(fields) == ncols
        if ok:
            try:
                ok = all(math.isfinite(float(f)) for f in fields)
            except ValueError:
                ok = False
        if not ok:
            raise InputValueError(
                f"{path}:{lineno}: expected {_LAYOUT[_rel(path)]} ({ncols} finite numbers), got {line!r}. "
                "Fix or re-extract the file."
            )
    raise InputValueError(f"could not parse '{path}' as {ncols} numbers per line; expected {_LAYOUT[_rel(path)]}.")


def _int_column(arr: np.ndarray, col: int, path: Path, what: str) -> np.ndarray:
    c = arr[:, col]
    bad = np.nonzero(c != np.round(c))[0]
    if bad.size:
        raise InputValueError(f"{path}: {what} must be integers, got {c[bad[0]]!r} on data row {bad[0] + 1}. "
                              f"Expected {_LAYOUT[_rel(path)]}.")
    return c.astype(np.int64)


def _id_map(arr_ids: np.ndarray, values: np.ndarray, path: Path) -> dict[int, object]:
    uniq, counts = np.unique(arr_ids, return_counts=True)
    if (counts > 1).any():
        raise InputValueError(f"{path}: image id {int(uniq[counts > 1][0])} appears more than once; expected one "
                              f"line per image ({_LAYOUT[_rel(path)]}).")
    return dict(zip(arr_ids.tolist(), values.tolist()))


def _contiguous_names(entries: list[tuple[int, str]], path: Path, what: str) -> list[str]:
    ids = [i for i, _ in entries]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise InputValueError(f"{path}: {what} ids must be 1..{len(ids)} each once, got {sorted(ids)[:10]}... "
                              f"Expected {_LAYOUT[_rel(path)]}.")
    return [name for _, name in sorted(entries)]


class CUB200(Dataset):
    """CUB-200-2011 birds: 200 classes, 15 part keypoints per image.

    Items (see :mod:`phpn_core.data.base`): ``image`` float32 ``[3, S, S]`` in ``[0, 1]``; ``label`` int (0-based,
    or the position in ``classes`` when a subset is given); ``image_id`` str, the path from ``images.txt``
    (e.g. ``"001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"``); ``keypoints`` float32 ``[15, 3]``
    rows ``(x, y, visible)`` in pixel coordinates of the returned image (geometry in the module docstring).

    Args:
        root: the ``CUB_200_2011`` directory.
        split: ``"train"`` or ``"test"`` (``train_test_split.txt``).
        image_size: side ``S`` of the returned square images (plain resize, aspect ratio not kept, as ProtoEval).
        crop_to_bbox: crop to the bird's bounding box before resizing (ProtoEval's test data).
        on_error: ``"raise"`` (an unreadable image raises :class:`~phpn_core.data.images.ImageLoadError` when its
            item is read) or ``"skip"`` (every image is decoded once at construction; unreadable ones are left out
            and their paths listed in ``skipped``, reasons in ``skip_reasons``).
        classes: optional 0-based class ids to keep; class ``classes[j]`` gets label ``j`` (names kept).
        max_pixels: refuse image files with more than this many pixels (decompression bombs); None: PIL's limit.

    Attributes:
        classes (list[str]), class_ids (list[int], original 0-based id per label), part_names (list[str], from
        parts.txt), mean/std (ImageNet), labels (list[int], item order), image_ids (list[str]),
        cub_ids (list[int], CUB's 1-based image ids), skipped (list[str]), skip_reasons (dict[str, str]).

    Metadata is parsed once at construction (~0.5 s for full CUB); images are decoded per item.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        image_size: int = 224,
        crop_to_bbox: bool = False,
        on_error: str = "raise",
        classes: Sequence[int] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if split not in ("train", "test"):
            raise InputValueError(f"split must be 'train' or 'test', got {split!r}.")
        self.image_size = check_image_size(image_size)
        self.on_error = check_on_error(on_error)
        self.max_pixels = check_max_pixels(max_pixels)
        self.crop_to_bbox = bool(crop_to_bbox)
        self.split = split
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputValueError(
                f"CUB root '{self.root}' is not a directory. Expected the extracted CUB_200_2011 folder holding "
                f"{_layout_hint()}."
            )

        needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
                  "parts/parts.txt", "parts/part_locs.txt"] + (["bounding_boxes.txt"] if crop_to_bbox else [])
        missing = [n for n in needed if not (self.root / n).is_file()]
        if missing:
            raise InputValueError(
                f"CUB root '{self.root}' lacks {', '.join(repr(m) for m in missing)}. The CUB-200-2011 layout "
                f"needs: {_layout_hint()}. Point root at the extracted CUB_200_2011 folder (it holds images.txt)."
            )

        # --- index the metadata once ---
        img_entries = _read_id_name(self.root / "images.txt")
        img_ids_all = np.array([i for i, _ in img_entries], dtype=np.int64)
        _id_map(img_ids_all, img_ids_all, self.root / "images.txt")  # duplicate check
        if img_ids_all.size == 0:
            raise InputValueError(f"'{self.root / 'images.txt'}' lists no images; expected {_LAYOUT['images.txt']}.")

        class_names_all = _contiguous_names(_read_id_name(self.root / "classes.txt"),
                                            self.root / "classes.txt", "class")
        n_classes_all = len(class_names_all)
        p = self.root / "image_class_labels.txt"
        lab = _read_numeric(p, 2)
        label_of = _id_map(_int_column(lab, 0, p, "image ids"), _int_column(lab, 1, p, "class ids"), p)
        p = self.root / "train_test_split.txt"
        spl = _read_numeric(p, 2)
        train_of = _id_map(_int_column(spl, 0, p, "image ids"), _int_column(spl, 1, p, "is_train flags"), p)

        for i in img_ids_all.tolist():
            for mapping, name in ((label_of, "image_class_labels.txt"), (train_of, "train_test_split.txt")):
                if i not in mapping:
                    raise InputValueError(f"image id {i} from images.txt has no line in '{self.root / name}'; "
                                          f"expected {_LAYOUT[name]} for every image. Re-extract the dataset.")
            if not 1 <= label_of[i] <= n_classes_all:
                raise InputValueError(f"'{self.root / 'image_class_labels.txt'}': image {i} has class id "
                                      f"{label_of[i]}, expected 1..{n_classes_all} (classes.txt).")
            if train_of[i] not in (0, 1):
                raise InputValueError(f"'{self.root / 'train_test_split.txt'}': image {i} has is_train "
                                      f"{train_of[i]}, expected 0 or 1.")

        # class subset -> relabel
        if classes is None:
            class_ids = list(range(n_classes_all))
        else:
            class_ids = self._check_classes(classes, n_classes_all)
        new_label = {c: j for j, c in enumerate(class_ids)}

        want_train = 1 if split == "train" else 0
        sel = [(i, rel) for i, rel in img_entries
               if train_of[i] == want_train and (label_of[i] - 1) in new_label]
        self.cub_ids: list[int] = [i for i, _ in sel]
        self.image_ids: list[str] = [rel for _, rel in sel]
        self.labels: list[int] = [new_label[label_of[i] - 1] for i in self.cub_ids]
        self.classes: list[str] = [class_names_all[c] for c in class_ids]
        self.class_ids: list[int] = class_ids
        self.part_names: list[str] = _contiguous_names(_read_id_name(self.root / "parts" / "parts.txt"),
                                                       self.root / "parts" / "parts.txt", "part")
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

        pos_of = {cid: k for k, cid in enumerate(self.cub_ids)}
        self._keypoints = self._index_part_locs(set(img_ids_all.tolist()), pos_of)  # [N, P, 3] float32
        self._bboxes = self._index_bboxes(set(img_ids_all.tolist()), pos_of) if crop_to_bbox else None  # [N, 4]

        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}
        if self.on_error == "skip":
            bad = find_unreadable([self._path(k) for k in range(len(self.cub_ids))], max_pixels=self.max_pixels)
            if bad:
                keep = [k for k in range(len(self.cub_ids)) if k not in bad]
                for k, reason in bad.items():
                    self.skipped.append(str(self._path(k)))
                    self.skip_reasons[str(self._path(k))] = reason
                self.cub_ids = [self.cub_ids[k] for k in keep]
                self.image_ids = [self.image_ids[k] for k in keep]
                self.labels = [self.labels[k] for k in keep]
                self._keypoints = self._keypoints[keep]
                if self._bboxes is not None:
                    self._bboxes = self._bboxes[keep]

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _check_classes(classes: Sequence[int], n: int) -> list[int]:
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or len(classes) == 0:
            raise InputValueError(f"classes must be a non-empty sequence of 0-based class ids, got {classes!r}.")
        out = []
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < n:
                raise InputValueError(f"classes must hold 0-based class ids in [0, {n}), got {c!r} in {classes!r}. "
                                      "Note CUB's classes.txt is 1-based: subtract 1.")
            out.append(int(c))
        if len(set(out)) != len(out):
            raise InputValueError(f"classes must not repeat an id, got {list(classes)!r}.")
        return out

    def _index_part_locs(self, known_ids: set[int], pos_of: dict[int, int]) -> np.ndarray:
        path = self.root / "parts" / "part_locs.txt"
        n_parts = len(self.part_names)
        kp = np.zeros((len(pos_of), n_parts, 3), dtype=np.float32)
        arr = _read_numeric(path, 5)
        if arr.size == 0:
            return kp
        img = _int_column(arr, 0, path, "image ids")
        part = _int_column(arr, 1, path, "part ids")
        vis = arr[:, 4]
        if ((part < 1) | (part > n_parts)).any():
            r = int(np.nonzero((part < 1) | (part > n_parts))[0][0])
            raise InputValueError(f"{path}: data row {r + 1} has part id {part[r]}, expected 1..{n_parts} "
                                  "(parts/parts.txt).")
        if not np.isin(vis, (0.0, 1.0)).all():
            r = int(np.nonzero(~np.isin(vis, (0.0, 1.0)))[0][0])
            raise InputValueError(f"{path}: data row {r + 1} has visible={vis[r]}, expected 0 or 1.")
        unknown = [i for i in np.unique(img).tolist() if i not in known_ids]
        if unknown:
            raise InputValueError(f"{path}: image id {unknown[0]} is not in images.txt; the files disagree. "
                                  "Re-extract the dataset.")
        pos = np.array([pos_of.get(i, -1) for i in img.tolist()], dtype=np.int64)
        m = pos >= 0
        # Rows missing for an image stay (0, 0, 0): invisible. Invisible rows are zeroed (CUB stores 0, 0 anyway).
        kp[pos[m], part[m] - 1, 0] = np.where(vis[m] > 0, arr[m, 2], 0.0)
        kp[pos[m], part[m] - 1, 1] = np.where(vis[m] > 0, arr[m, 3], 0.0)
        kp[pos[m], part[m] - 1, 2] = vis[m]
        return kp

    def _index_bboxes(self, known_ids: set[int], pos_of: dict[int, int]) -> np.ndarray:
        path = self.root / "bounding_boxes.txt"
        arr = _read_numeric(path, 5)
        ids = _int_column(arr, 0, path, "image ids")
        box_of = _id_map(ids, arr[:, 1:], path)
        out = np.zeros((len(pos_of), 4), dtype=np.float64)
        for cid, k in pos_of.items():
            if cid not in box_of:
                raise InputValueError(f"image id {cid} has no line in '{path}'; crop_to_bbox=True needs "
                                      f"{_LAYOUT['bounding_boxes.txt']} for every image.")
            x, y, w, h = box_of[cid]
            if x < 0 or y < 0 or math.floor(w) < 1 or math.floor(h) < 1:
                raise InputValueError(f"{path}: image {cid} has box x={x}, y={y}, w={w}, h={h}; expected x, y >= 0 "
                                      "and width, height >= 1. Fix the line or use crop_to_bbox=False.")
            out[k] = (x, y, w, h)
        return out

    # ------------------------------------------------------------------ items

    def _path(self, k: int) -> Path:
        return self.root / "images" / self.image_ids[k]

    def __len__(self) -> int:
        return len(self.image_ids)

    def _box(self, k: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Half-open integer crop box ``(x0, y0, x1, y1)`` for item k on an image of ``size = (W, H)``."""
        W, H = size
        if self._bboxes is None:
            return 0, 0, W, H
        x, y, w, h = self._bboxes[k]
        x0, y0 = math.floor(x), math.floor(y)
        x1, y1 = min(x0 + math.floor(w), W), min(y0 + math.floor(h), H)
        if x1 <= x0 or y1 <= y0:
            raise InputValueError(
                f"bounding box of image '{self.image_ids[k]}' (x={x}, y={y}, w={w}, h={h}) lies outside the "
                f"{W}x{H} image; expected a box inside the image. Fix bounding_boxes.txt or use crop_to_bbox=False."
            )
        return x0, y0, x1, y1

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        k = index % len(self)
        im = open_rgb(self._path(k), max_pixels=self.max_pixels)
        x0, y0, x1, y1 = self._box(k, im.size)
        if (x0, y0, x1, y1) != (0, 0, *im.size):
            im = im.crop((x0, y0, x1, y1))
        S = self.image_size
        if im.size != (S, S):
            im = im.resize((S, S), Image.Resampling.BILINEAR)  # antialiased like torchvision's Resize on PIL

        kp = torch.from_numpy(self._keypoints[k].copy())  # [P, 3], new tensor per item
        x, y = kp[:, 0].double(), kp[:, 1].double()  # float64 so the mapping is exact to float32 rounding
        inside = (kp[:, 2] > 0) & (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        kp[:, 0] = torch.where(inside, (x - x0) * S / (x1 - x0), 0.0).float()
        kp[:, 1] = torch.where(inside, (y - y0) * S / (y1 - y0), 0.0).float()
        kp[:, 2] = inside.float()
        return {"image": pil_to_tensor(im), "label": self.labels[k], "image_id": self.image_ids[k], "keypoints": kp}

    def __repr__(self) -> str:
        return (f"CUB200(root='{self.root}', split={self.split!r}, n={len(self)}, classes={len(self.classes)}, "
                f"image_size={self.image_size}, crop_to_bbox={self.crop_to_bbox}, skipped={len(self.skipped)})")
