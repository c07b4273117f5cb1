"""Build a dataset from the run configuration's ``dataset`` section; per-class sampling; class names of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..config import DatasetConfig
from ..errors import ConfigError, InputValueError

__all__ = ["PerClassSample", "RunDatasets", "build_dataset", "class_names_for_run", "sample_per_class"]


def build_dataset(cfg: DatasetConfig, split: str):
    """The ``split`` ("train" or "test") of the configured dataset (see :mod:`phpn_core.data.base`).

    ``cfg.max_per_class`` samples the training split (:class:`PerClassSample`, seeded by ``cfg.seed``); the test
    split is always whole. ``cfg.class_map`` maps ImageFolder folders to head rows.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test'; got {split!r}.")
    ds = _build(cfg, split)
    if split == "train" and cfg.max_per_class is not None:
        ds = PerClassSample(ds, max_per_class=cfg.max_per_class, seed=cfg.seed)
    return ds


class RunDatasets:
    """One run's datasets: each split is built by :func:`build_dataset` on first use and then shared, so that the
    pre-flight, the model preparation, the class names, the extraction, the evaluation and the report of one run
    read the same objects (building a file-backed dataset lists and validates every file: once per run is enough).

    ``builds`` counts the splits built so far (``{"train": 1, "test": 1}`` after a whole run).
    """

    def __init__(self, cfg: DatasetConfig) -> None:
        if not isinstance(cfg, DatasetConfig):
            raise ConfigError(f"RunDatasets needs the run's DatasetConfig; got {type(cfg).__name__}. "
                              "Fix: pass cfg.dataset.")
        self.cfg = cfg
        self._built: dict[str, Any] = {}
        self.builds: dict[str, int] = {}

    def split(self, name: str):
        """The ``name`` split ("train" or "test"), built once."""
        if name not in self._built:
            self._built[name] = build_dataset(self.cfg, name)
            self.builds[name] = self.builds.get(name, 0) + 1
        return self._built[name]

    @property
    def train(self):
        return self.split("train")

    @property
    def test(self):
        return self.split("test")

    @classmethod
    def of(cls, cfg: DatasetConfig, datasets: RunDatasets | None) -> RunDatasets:
        """``datasets`` when the caller has the run's, else a fresh one for ``cfg`` (a task called on its own)."""
        if datasets is None:
            return cls(cfg)
        if datasets.cfg != cfg:
            raise ConfigError("the datasets passed belong to another dataset config than the run's: expected "
                              "RunDatasets(cfg.dataset) of this run. Fix: build them from the same config.")
        return datasets


def _build(cfg: DatasetConfig, split: str):
    if cfg.kind == "synthparts":
        from .synthparts import SynthParts

        n = cfg.train_per_class if split == "train" else cfg.test_per_class
        return SynthParts(split=split, n_classes=cfg.n_classes, n_per_class=n, image_size=cfg.image_size,
                          seed=cfg.seed, part_variants=cfg.part_variants)
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
            raise ConfigError(f"dataset.root must contain {split}/ with one folder per class; no directory {root}. "
                              f"Fix: put the {split} images in {root}/<class name>/.")
        return ImageFolderDataset(root, image_size=cfg.image_size, on_error=cfg.on_error, class_map=cfg.class_map)
    from .fashion_mnist import FashionMNIST

    return FashionMNIST(cfg.root or "/usr/share/datasets/fashion-mnist", split=split, image_size=cfg.image_size)


def sample_per_class(labels: Sequence[int], max_per_class: int, *, seed: int = 0) -> list[int]:
    """Indices of a seeded sample of at most ``max_per_class`` items per label, ascending (item order kept).

    Class ``c``'s sample depends only on ``(seed, c)`` and its own items: adding images of another class, or
    another class altogether, leaves it unchanged. Classes with fewer items keep all of them.
    """
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, (int, np.integer)) or max_per_class < 1:
        raise InputValueError(f"max_per_class must be a positive int, got {max_per_class!r}. Fix: pass e.g. 50.")
    lab = np.asarray([int(v) for v in labels], dtype=np.int64)
    keep: list[np.ndarray] = []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        if len(idx) > max_per_class:
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c)])
            idx = idx[rng.permutation(len(idx))[:max_per_class]]
        keep.append(idx)
    return sorted(int(i) for i in np.concatenate(keep)) if keep else []


class PerClassSample(Dataset):
    """A seeded per-class sample of a phpn dataset (:func:`sample_per_class`), with the same sample contract.

    Items are ``base[indices[i]]`` (same image ids); ``classes``, ``part_names``, ``mean``, ``std``, ``split``,
    ``image_size`` are the base's, ``labels``/``image_ids`` those of the sample. ``max_per_class`` and
    ``sample_seed`` are public settings, so :func:`phpn_core.extract.dataset_fingerprint` (the store's identity)
    changes with the sample; the base's own scalar settings are copied too, so they stay in the identity.
    """

    def __init__(self, base: Any, *, max_per_class: int, seed: int = 0) -> None:
        labels = getattr(base, "labels", None)
        ids = getattr(base, "image_ids", None)
        if labels is None or ids is None or callable(ids):
            raise InputValueError(
                f"{type(base).__name__} has no labels / image_ids lists: expected a phpn dataset "
                "(phpn_core.data.base's contract). Fix: add them, or leave dataset.max_per_class unset.")
        for k, v in vars(base).items():  # the base's public scalar settings (seed, crop_to_bbox, ...), for identity
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str))):
                setattr(self, k, v)
        self.base = base
        self.max_per_class = int(max_per_class)
        self.sample_seed = int(seed)
        self.indices = sample_per_class(labels, self.max_per_class, seed=self.sample_seed)
        self.labels: list[int] = [int(labels[i]) for i in self.indices]
        self.image_ids: list[str] = [str(ids[i]) for i in self.indices]
        self.classes = list(base.classes)
        self.part_names = getattr(base, "part_names", None)
        self.mean, self.std = base.mean, base.std
        self.root = getattr(base, "root", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return self.base[self.indices[index]]

    def __repr__(self) -> str:
        return (f"PerClassSample({self.base!r}, max_per_class={self.max_per_class}, seed={self.sample_seed}, "
                f"n={len(self)})")


def class_names_for_run(dataset: Any, n_classes: int, model_names: Sequence[str] | None = None) -> list[str]:
    """The ``n_classes`` names of a run's head rows, ``[C]`` strings.

    ``model_names`` (the model's own category names, e.g. a torchvision weights' ImageNet names) win when given
    (length C); else the dataset's ``classes`` (ImageFolder folders through the class map, CUB's and synthparts'
    names, Fashion-MNIST's), with ``"class <row>"`` for rows the dataset does not name.
    """
    C = int(n_classes)
    if model_names is not None:
        names = [str(n) for n in model_names]
        if len(names) != C:
            raise InputValueError(f"model_names must hold one name per head row: expected {C}, got {len(names)}. "
                                  "Fix: pass the categories of the weights the model was built with.")
        return names
    given = [str(n) for n in (getattr(dataset, "classes", None) or [])]
    return [given[r] if r < len(given) else f"class {r}" for r in range(C)]
