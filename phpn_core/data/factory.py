"""Build a dataset from the run configuration's ``dataset`` section."""

from __future__ import annotations

from ..config import DatasetConfig
from ..errors import ConfigError

__all__ = ["build_dataset"]


def build_dataset(cfg: DatasetConfig, split: str):
    """The ``split`` ("train" or "test") of the configured dataset (see :mod:`phpn_core.data.base`)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test'; got {split!r}.")
    if cfg.kind == "synthparts":
        from .synthparts import SynthParts

        n = cfg.train_per_class if split == "train" else cfg.test_per_class
        return SynthParts(split=split, n_classes=cfg.n_classes, n_per_class=n, image_size=cfg.image_size,
                          seed=cfg.seed)
    if cfg.kind == "cub200":
        from .cub import CUB200

        # ProtoEval evaluates on bird crops; training features use the whole image as the classifier saw it.
        return CUB200(cfg.root, split=split, image_size=cfg.image_size,
                      crop_to_bbox=cfg.crop_to_bbox and split == "test", on_error=cfg.on_error)
    if cfg.kind == "imagefolder":
        from pathlib import Path

        from .imagefolder import ImageFolderDataset

        root = Path(cfg.root) / split
        if not root.is_dir():
            raise ConfigError(f"dataset.root must contain {split}/ with one folder per class; no directory {root}.")
        return ImageFolderDataset(root, image_size=cfg.image_size, on_error=cfg.on_error)
    from .fashion_mnist import FashionMNIST

    return FashionMNIST(cfg.root or "/usr/share/datasets/fashion-mnist", split=split, image_size=cfg.image_size)
