"""A class-per-subfolder image tree, with torchvision ``ImageFolder`` semantics and phpn's sample contract."""

from __future__ import annotations

import os
from collections.abc import Iterable
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

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset"]

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


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**/<file>``: class = top-level subfolder (sorted by name), label = its index.

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

    Attributes: classes (list[str]), class_to_idx (dict), part_names (None), mean/std (ImageNet),
    labels (list[int]), image_ids (list[str]), skipped (list[str]), skip_reasons (dict[str, str]).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int = 224,
        on_error: str = "raise",
        extensions: Iterable[str] = IMG_EXTENSIONS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.image_size = check_image_size(image_size)
        self.on_error = check_on_error(on_error)
        self.max_pixels = check_max_pixels(max_pixels)
        self.extensions = _normalise_extensions(extensions)
        if not self.root.is_dir():
            raise InputValueError(f"ImageFolder root '{self.root}' is not a directory. Expected a folder with one "
                                  "subfolder per class holding that class's images.")

        self.classes: list[str] = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise InputValueError(f"found no class subfolder in '{self.root}'. Expected root/<class>/<image> "
                                  f"files with endings {self.extensions}.")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        self.image_ids: list[str] = []
        self.labels: list[int] = []
        empty = []
        for c in self.classes:
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
