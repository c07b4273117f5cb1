"""What several tasks read of a run's inputs: the classifier a model record describes, the image files of a
dataset, and the full list of unreadable images behind an extraction failure. Below both ``tasks.prepare`` and
``tasks.extract`` (neither imports the other)."""

from __future__ import annotations

from pathlib import Path

from phpn_core.config import RunConfig

__all__ = ["all_unreadable", "image_paths", "load_classifier"]


def load_classifier(model_rec: dict):
    """``(model, features, weight, bias)`` of the classifier that :func:`tasks.prepare.prepare_model` described."""
    from phpn_core.models.split import split_classifier
    from phpn_core.models.spec import ModelSpec, build_model

    spec = ModelSpec(arch=model_rec["arch"], checkpoint=model_rec["checkpoint"], weights=model_rec.get("weights"),
                     num_classes=model_rec["num_classes"], input_size=model_rec["input_size"])
    model = build_model(spec).eval()
    return model, *split_classifier(model)


def image_paths(ds) -> list[Path] | None:
    """The image files of a file-backed dataset (CUB, ImageFolder), None for generated/array datasets."""
    base = getattr(ds, "base", None)
    if base is not None and hasattr(ds, "indices"):  # a per-class sample (dataset.max_per_class): its files only
        paths = image_paths(base)
        return None if paths is None else [paths[i] for i in ds.indices]
    if hasattr(ds, "_path") and hasattr(ds, "cub_ids"):
        return [Path(ds._path(i)) for i in range(len(ds))]
    if hasattr(ds, "image_ids") and isinstance(getattr(ds, "root", None), Path) and hasattr(ds, "extensions"):
        return [ds.root / rid for rid in ds.image_ids]
    return None


def all_unreadable(cfg: RunConfig, split: str, uri: str, chunks: list[int], first: Exception, *,
                   datasets=None) -> Exception:
    """The first unreadable image stopped the task: probe the other images of its chunks (only now, on failure)
    and name them all."""
    from phpn_core.data.factory import RunDatasets
    from phpn_core.data.images import ImageLoadError, find_unreadable
    from phpn_core.storage.feature_store import FeatureStore

    try:
        paths = image_paths(RunDatasets.of(cfg.dataset, datasets).split(split))
        store = FeatureStore.open(uri)
        idx = [int(i) for k in chunks for i in store.chunk_indices(k)]
    except Exception:  # noqa: BLE001 - the first error is the one to report then
        return first
    if paths is None:
        return first
    mine = [paths[i] for i in idx]
    bad = find_unreadable(mine)
    if not bad:
        return first
    shown = "; ".join(bad[i] for i in sorted(bad)[:5])  # each reason names its file
    return ImageLoadError(
        f"{len(bad)} of the {len(mine)} {split} images in chunks {chunks[0]}-{chunks[-1]} of the feature store cannot "
        f"be used: {shown}{' ...' if len(bad) > 5 else ''}. Their features were not written. Expected complete, "
        "readable images. Fix: replace or remove those files, or set dataset.on_error: skip to leave them out.",
        path=str(mine[min(bad)]),
    )
