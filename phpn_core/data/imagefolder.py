"""A class-per-subfolder image tree, with torchvision ``ImageFolder`` semantics and phpn's sample contract."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch.utils.data import Dataset

from phpn_core.data.base import IMAGENET_MEAN, IMAGENET_STD, Sample
from phpn_core.data.images import (
    DEFAULT_MAX_PIXELS,
    check_image_size,
    check_max_pixels,
    check_on_error,
    find_unreadable,
    load_image,
)
from phpn_core.errors import InputValueError

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "read_class_map"]

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = []
    for e in extensions:
        if not isinstance(e, str) or not e.strip(".").strip():
            raise InputValueError(f"extensions must be non-empty strings such as '.jpg', got {e!r}.")
        e = e.lower()
        exts.append(e if e.startswith(".") else "." + e)
    if not exts:
        raise InputValueError(f"extensions must name at least one file ending, e.g. {IMG_EXTENSIONS}.")
    return tuple(exts)


def read_class_map(class_map: str | os.PathLike | Mapping[str, int]) -> dict[str, int]:
    """A class map ``{folder name: head row}`` from a JSON file (or a mapping, checked the same way).

    Rows are ints >= 0, distinct (two folders on one row would merge two classes). Errors name the file and the
    offending entries.
    """
    where = "class_map"
    if isinstance(class_map, (str, os.PathLike)):
        where = f"class map '{class_map}'"
        try:
            data = json.loads(Path(class_map).expanduser().read_text())
        except FileNotFoundError:
            raise InputValueError(f"{where} does not exist. Expected a JSON file {{\"folder name\": head row}}. "
                                  "Fix: check dataset.class_map's path.") from None
        except (OSError, ValueError) as e:
            raise InputValueError(f"{where} is not readable JSON ({type(e).__name__}: {e}). Expected "
                                  '{"folder name": head row, ...}. Fix: correct the file.') from None
    else:
        data = class_map
    if not isinstance(data, Mapping) or not data:
        raise InputValueError(f"{where} must be a non-empty JSON object {{\"folder name\": head row}}, got "
                              f"{type(data).__name__}. Fix: write e.g. {{\"tabby\": 281, \"espresso\": 967}}.")
    bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise InputValueError(f"{where} maps {sorted(bad)[:5]} to {[bad[k] for k in sorted(bad)[:5]]}: expected "
                              "head rows (ints >= 0). Fix: give each folder its row in the classifier's head.")
    rows: dict[int, list[str]] = {}
    for k, v in data.items():
        rows.setdefault(v, []).append(str(k))
    dup = {r: ns for r, ns in rows.items() if len(ns) > 1}
    if dup:
        raise InputValueError(f"{where} maps several folders to one head row: {dup}. Expected one folder per row. "
                              "Fix: merge those folders into one, or map each to its own row.")
    return {str(k): int(v) for k, v in data.items()}


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**/<file>``: class = top-level subfolder (sorted by name), label = its index, or
    its head row in ``class_map``.

    As torchvision's ``ImageFolder``: hidden entries are not skipped, subfolders are walked recursively
    (following links), files are matched by a case-insensitive extension and sorted, and a class folder with no
    matching file is an error. Items: ``image`` float32 ``[3, S, S]`` in ``[0, 1]`` (plain resize), ``label`` int,
    ``image_id`` the file's path relative to ``root`` with ``/`` separators; no keypoints (``part_names`` is None).

    Args:
        root: the tree's top folder.
        image_size: side ``S`` of the returned square images.
        on_error: ``"raise"`` (an unreadable file raises :class:`~phpn_core.data.images.ImageLoadError` when read)
            or ``"skip"`` (all files decoded once at construction; unreadable ones left out, listed in ``skipped``).
        extensions: file endings to include.
        max_pixels: refuse image files with more than this many pixels (decompression bombs).
        class_map: ``{folder name: head row}`` (a dict or the path of a JSON file, see :func:`read_class_map`):
            each folder's images get its row as label. Every folder must be named (the error lists those that are
            not); names without a folder are ignored (one map can serve several image trees). Then ``classes`` has
            ``max(row of a present folder) + 1`` entries: the folder name at each mapped row, ``"class <row>"``
            elsewhere; ``mapped_rows`` lists the rows that have a folder.

    Attributes: classes (list[str]), class_to_idx (dict), mapped_rows (list[int]), part_names (None), mean/std
    (ImageNet), labels (list[int]), image_ids (list[str]), skipped (list[str]), skip_reasons (dict[str, str]).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int = 224,
        on_error: str = "raise",
        extensions: Iterable[str] = IMG_EXTENSIONS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        class_map: str | os.PathLike | Mapping[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_size = check_image_size(image_size)
        self.on_error = check_on_error(on_error)
        self.max_pixels = check_max_pixels(max_pixels)
        self.extensions = _normalise_extensions(extensions)
        if not self.root.is_dir():
            raise InputValueError(f"ImageFolder root '{self.root}' is not a directory. Expected a folder with one "
                                  "subfolder per class holding that class's images.")

        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not folders:
            raise InputValueError(f"found no class subfolder in '{self.root}'. Expected root/<class>/<image> "
                                  f"files with endings {self.extensions}.")
        if class_map is None:
            self.classes: list[str] = folders
            self.class_to_idx = {c: i for i, c in enumerate(folders)}
        else:
            cmap = read_class_map(class_map)
            unnamed = [f for f in folders if f not in cmap]
            if unnamed:
                shown = ", ".join(repr(f) for f in unnamed[:10]) + (" ..." if len(unnamed) > 10 else "")
                raise InputValueError(
                    f"{len(unnamed)} class folder(s) under '{self.root}' are not in the class map: {shown}. Expected "
                    f"every folder named in dataset.class_map (it names {len(cmap)}). Fix: add "
                    f"\"<folder>\": <head row> for each to the map, or remove those folders.")
            self.class_to_idx = {f: cmap[f] for f in folders}
            n_rows = max(self.class_to_idx.values()) + 1
            self.classes = [f"class {r}" for r in range(n_rows)]
            for f, r in self.class_to_idx.items():
                self.classes[r] = f
        self.mapped_rows: list[int] = sorted(self.class_to_idx.values())

        self.image_ids: list[str] = []
        self.labels: list[int] = []
        empty = []
        for c in folders:
            n_before = len(self.image_ids)
            for dirpath, _, fnames in sorted(os.walk(self.root / c, followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(self.extensions):
                        rel = Path(dirpath, fname).relative_to(self.root).as_posix()
                        self.image_ids.append(rel)
                        self.labels.append(self.class_to_idx[c])
            if len(self.image_ids) == n_before:
                empty.append(c)
        if empty:
            raise InputValueError(
                f"found no image file in class folder(s) {empty} under '{self.root}'. Expected files ending in "
                f"{self.extensions}. Add images, remove the empty folders, or pass extensions=..."
            )
        self.part_names = None
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}
        if self.on_error == "skip":
            bad = find_unreadable([self.root / r for r in self.image_ids], max_pixels=self.max_pixels)
            if bad:
                for k, reason in bad.items():
                    p = str(self.root / self.image_ids[k])
                    self.skipped.append(p)
                    self.skip_reasons[p] = reason
                keep = [k for k in range(len(self.image_ids)) if k not in bad]
                self.image_ids = [self.image_ids[k] for k in keep]
                self.labels = [self.labels[k] for k in keep]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        k = index % len(self)
        image, _ = load_image(self.root / self.image_ids[k], image_size=self.image_size, max_pixels=self.max_pixels)
        return {"image": image, "label": self.labels[k], "image_id": self.image_ids[k]}

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root='{self.root}', n={len(self)}, classes={len(self.classes)}, "
                f"image_size={self.image_size}, skipped={len(self.skipped)})")
