"""Fashion-MNIST from its IDX files (as Debian's ``dataset-fashion-mnist`` installs them), as 3-channel images."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from phpn_core.data.base import Sample
from phpn_core.data.images import check_image_size
from phpn_core.errors import InputValueError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DEFAULT_ROOT", "FashionMNIST", "read_idx"]

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Training-set pixel statistics in [0, 1], replicated over the 3 channels.
_MEAN, _STD = 0.2860, 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08  # IDX type code for unsigned bytes; magic = 0x00 0x00 <type> <ndim>


def read_idx(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped when the name ends in .gz) -> uint8 array of ``ndim`` dims.

    Validates the magic number (``0x0000 08 <ndim>``) and that the payload size matches the header; errors name
    the file, the expected and the found values.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError as e:
        raise InputValueError(f"IDX file '{path}' does not exist.") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise InputValueError(f"IDX file '{path}' is not a readable gzip file ({type(e).__name__}: {e}); "
                              "expected the gzipped Fashion-MNIST file. Re-download or reinstall it.") from e
    expected_magic = (_UBYTE << 8) | ndim
    if len(raw) < 4 + 4 * ndim:
        raise InputValueError(f"IDX file '{path}' is {len(raw)} bytes, too short for a {ndim}-dim IDX header "
                              f"({4 + 4 * ndim} bytes); the file is truncated or not IDX.")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise InputValueError(
            f"IDX file '{path}' has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} (unsigned bytes, "
            f"{ndim} dims: {'images' if ndim == 3 else 'labels'}). Check that the file is the right one "
            "(images vs labels) and not corrupt."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    n_payload = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - 4 - 4 * ndim
    if payload != n_payload:
        raise InputValueError(f"IDX file '{path}' header says shape {tuple(dims)} = {n_payload} bytes of data, "
                              f"found {payload}; the file is truncated or corrupt. Re-download or reinstall it.")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise InputValueError(
        f"Fashion-MNIST file '{root / (stem + '.gz')}' (or uncompressed '{stem}') not found. Expected the four IDX "
        f"files {sorted(s + '.gz' for pair in _FILES.values() for s in pair)} in '{root}' (Debian package "
        "dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist); pass root=... if elsewhere."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST: 10 classes of 28x28 grayscale clothing images (60000 train, 10000 test).

    Items: ``image`` float32 ``[3, S, S]`` in ``[0, 1]`` (the gray channel replicated; bilinear resize when
    ``S != 28``), ``label`` int, ``image_id`` ``"<split>/<index in the file, 5 digits>"``; no keypoints.

    Args:
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``"train"`` or ``"test"``.
        image_size: side ``S`` of the returned images.
        limit_per_class: keep only the first n images of each class (file order), for small runs.

    Attributes: classes, part_names (None), mean/std (Fashion-MNIST statistics, per channel), labels (list[int]),
    image_ids (list[str]). The whole split is decoded into memory at construction (47 MB for train).
    """

    def __init__(
        self,
        root: str | os.PathLike = FASHION_MNIST_DEFAULT_ROOT,
        *,
        split: str = "train",
        image_size: int = 28,
        limit_per_class: int | None = None,
    ) -> None:
        if split not in _FILES:
            raise InputValueError(f"split must be 'train' or 'test', got {split!r}.")
        if limit_per_class is not None and (isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int)
                                            or limit_per_class < 1):
            raise InputValueError(f"limit_per_class must be a positive int or None, got {limit_per_class!r}.")
        self.image_size = check_image_size(image_size)
        self.split = split
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputValueError(
                f"Fashion-MNIST root '{self.root}' is not a directory. Install Debian's dataset-fashion-mnist "
                "package (files land in /usr/share/datasets/fashion-mnist) or pass root=<folder with the IDX files>."
            )
        img_path, lab_path = (_find(self.root, s) for s in _FILES[split])
        images = read_idx(img_path, ndim=3)
        labels = read_idx(lab_path, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise InputValueError(f"'{img_path}' holds {images.shape[0]} images but '{lab_path}' holds "
                                  f"{labels.shape[0]} labels; expected equal counts. The files do not belong "
                                  "together.")
        n_classes = len(FASHION_MNIST_CLASSES)
        if labels.size and int(labels.max()) >= n_classes:
            raise InputValueError(f"'{lab_path}' holds label {int(labels.max())}, expected 0..{n_classes - 1}.")

        idx = np.arange(labels.shape[0])
        if limit_per_class is not None:
            # First `limit` occurrences of each class, in file order.
            rank = np.zeros_like(idx)
            for c in range(n_classes):
                m = labels == c
                rank[m] = np.arange(int(m.sum()))
            idx = idx[rank < limit_per_class]
        self._images = torch.from_numpy(images[idx].copy())  # [N, 28, 28] uint8
        self.labels: list[int] = labels[idx].astype(np.int64).tolist()
        self.image_ids: list[str] = [f"{split}/{i:05d}" for i in idx.tolist()]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.part_names = None
        self.mean = (_MEAN,) * 3
        self.std = (_STD,) * 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        x = self._images[index].to(torch.float32).div_(255.0)[None, None]  # [1, 1, 28, 28], new tensor
        S = self.image_size
        if x.shape[-1] != S or x.shape[-2] != S:
            # Bilinear with antialias is a convex combination: stays in [0, 1].
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        return {"image": x[0].expand(3, S, S).contiguous(), "label": self.labels[index],
                "image_id": self.image_ids[index]}

    def __repr__(self) -> str:
        return f"FashionMNIST(root='{self.root}', split={self.split!r}, n={len(self)}, image_size={self.image_size})"
