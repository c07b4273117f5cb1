"""Model preparation and feature extraction tasks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect import task

from phpn_core.config import RunConfig

from .common import pick_device, retry_on_io
from .inputs import all_unreadable, image_paths, load_classifier


@task(cache_policy=NO_CACHE, name="prepare-model", task_run_name="prepare-model-{cfg.model.arch}")
def prepare_model(cfg: RunConfig, out_dir: str, datasets=None) -> dict:
    """The classifier's spec and checkpoint digest; trains the synthparts CNN when no checkpoint is given
    (once: a finished checkpoint under ``out_dir`` is reused)."""
    from phpn_core.data.factory import RunDatasets
    from phpn_core.models.spec import checkpoint_digest

    datasets = RunDatasets.of(cfg.dataset, datasets)
    n_classes = cfg.model.num_classes
    ckpt = cfg.model.checkpoint
    trained = False
    if cfg.model.arch == "synthparts_cnn" and ckpt is None:
        from phpn_core.models.synthparts_cnn import save_model, train_synthparts_cnn

        path = Path(out_dir) / "model" / "synthparts_cnn.safetensors"
        # Reused only when trained with the same settings: the sidecar is written after the model.
        recipe = {"epochs": cfg.model.train_epochs, "stride": cfg.model.feature_stride,
                  "dataset": cfg.dataset.model_dump(mode="json")}
        sidecar = path.with_suffix(".json")
        if not (path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == recipe):
            train = datasets.train
            model = train_synthparts_cnn(train, epochs=cfg.model.train_epochs, stride=cfg.model.feature_stride,
                                         seed=cfg.dataset.seed, device=pick_device(cfg.compute.device),
                                         progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(model, path)
            sidecar.write_text(json.dumps(recipe, indent=1))
            trained = True
        ckpt = str(path)
    weights = getattr(cfg.model, "weights", None)
    if weights:  # torchvision weights by name: C from their categories, the digest of the cached file
        from phpn_core.models.spec import ModelSpec, spec_digest

        spec = ModelSpec(arch=cfg.model.arch, weights=weights, num_classes=n_classes,
                         input_size=cfg.dataset.image_size)
        return {"arch": cfg.model.arch, "checkpoint": None, "weights": weights, "num_classes": spec.num_classes,
                "input_size": cfg.dataset.image_size, "digest": spec_digest(spec), "trained": False}
    if n_classes is None:
        n_classes = len(datasets.test.classes)
    return {"arch": cfg.model.arch, "checkpoint": ckpt, "num_classes": n_classes,
            "input_size": cfg.dataset.image_size, "digest": checkpoint_digest(ckpt), "trained": trained}


@task(cache_policy=NO_CACHE, name="extract-features", task_run_name="extract-{split}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def extract_split(cfg: RunConfig, model_rec: dict, split: str, uri: str, datasets=None) -> dict:
    """Extract (or resume, or reuse) the ``split`` features of the configured dataset into the store at ``uri``."""
    from phpn_core.data.factory import RunDatasets
    from phpn_core.data.images import ImageLoadError
    from phpn_core.extract import extract_features

    datasets = RunDatasets.of(cfg.dataset, datasets)
    _, features, _, _ = load_classifier(model_rec)
    ds = datasets.split(split)
    try:
        res = extract_features(
            features, ds, uri, model=model_rec["arch"], checkpoint_digest=model_rec["digest"], split=split,
            input_size=cfg.dataset.image_size, dataset_name=cfg.dataset.kind, dtype=cfg.compute.feature_dtype,
            batch_size=cfg.compute.batch_size, device=pick_device(cfg.compute.device), progress=True,
            compression=cfg.compute.feature_compression,
        )
    except ImageLoadError as e:  # beyond the pre-flight's sample: name every unreadable image of the split
        from phpn_core.storage.feature_store import FeatureStore

        raise all_unreadable(cfg, split, uri, list(range(FeatureStore.open(uri).n_chunks)), e,
                             datasets=datasets) from None
    return res.record()


def check_inputs(cfg: RunConfig, out_dir: str | None = None, datasets=None) -> dict:
    """Everything about the inputs that can be checked before any compute (no training, extraction or
    decomposition); raises a :class:`~phpn_core.errors.PhpnError` that names the file / class / tensor at fault:

    - the checkpoint loads into ``cfg.model.arch`` (another architecture, a pickled object, a truncated file are
      refused, nothing unpickled) and holds only finite numbers (NaN weights would give NaN features);
    - every image of a file-backed dataset (``on_error="raise"``) decodes: truncated, corrupt or over-limit
      ("huge") files are listed (grayscale and other modes are converted, not refused);
    - every class has enough feature rows for k prototypes: ``k <= min(n_c * H * W, D)``, with ``H, W, D`` from one
      forward pass of the model on a blank image.

    - no symbolic link inside a local feature store or registry (``out_dir/features``, ``out_dir/registry`` or the
      configured URIs) points outside its root (writes would land elsewhere).

    Returns a small record (``n_classes``, ``feature_shape``, ``min_class_images``). Called by the decompose flow in
    the driver before its first task."""
    import torch

    from phpn_core.data.factory import RunDatasets
    from phpn_core.data.images import ImageLoadError, find_unreadable
    from phpn_core.errors import InputValueError
    from phpn_core.models.spec import CheckpointError, ModelSpec, build_model
    from phpn_core.models.split import split_classifier

    roots = [cfg.storage.features_uri or (out_dir and str(Path(out_dir) / "features")),
             cfg.storage.registry_uri or (out_dir and str(Path(out_dir) / "registry"))]
    for root in roots:
        if root:
            refuse_escaping_links(root)
    datasets = RunDatasets.of(cfg.dataset, datasets)
    train = datasets.train
    paths = image_paths(train)
    if paths is not None and cfg.dataset.on_error == "raise":
        test = datasets.test
        test_paths = image_paths(test) or []
        # Up to PREFLIGHT_FULL images: all probed here. Beyond: an evenly spaced sample here (a bad batch of files
        # fails in seconds), the rest where extraction reads them anyway (an unreadable image fails its extraction
        # task, which names every unreadable image of its chunks; its features are never written).
        all_paths = preflight_sample([*paths, *test_paths])
        bad = find_unreadable(all_paths)
        if bad:
            shown = "; ".join(bad[i] for i in sorted(bad)[:5])
            raise ImageLoadError(
                f"{len(bad)} of {len(all_paths)} images under dataset.root={cfg.dataset.root!r} cannot be used: "
                f"{shown}{' ...' if len(bad) > 5 else ''}. Expected complete, readable images. Fix: replace or "
                "remove those files, or set dataset.on_error: skip to leave them out.",
                path=all_paths[min(bad)],
            )
    labels = [int(x) for x in (train.labels.tolist() if hasattr(train.labels, "tolist") else train.labels)]
    weight_names = model_class_names(cfg, {"arch": cfg.model.arch})  # weights by name: C is their category count
    C = cfg.model.num_classes or (len(weight_names) if weight_names else len(train.classes))
    spec = ModelSpec(arch=cfg.model.arch, checkpoint=cfg.model.checkpoint, weights=getattr(cfg.model, "weights", None),
                     num_classes=C, input_size=cfg.dataset.image_size)
    model = build_model(spec)  # CheckpointError for another architecture, a pickle, a truncated file
    bad_tensors = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad_tensors:
        raise CheckpointError(
            f"Checkpoint {cfg.model.checkpoint!r} holds NaN/inf in {len(bad_tensors)} tensors "
            f"({', '.join(bad_tensors[:5])}{' ...' if len(bad_tensors) > 5 else ''}): expected finite weights; "
            "its features would be NaN. Fix: use a checkpoint from before the training diverged."
        )
    features, _, _ = split_classifier(model)
    S = cfg.dataset.image_size
    with torch.inference_mode():
        fmap = features(torch.zeros(1, 3, S, S))
    _, D, H, W = fmap.shape
    too_high = sorted({c for c in labels if c >= C})
    if too_high:
        raise InputValueError(
            f"the training images are labelled with head rows up to {too_high[-1]}, but the model's head has C={C} "
            f"rows (0..{C - 1}): rows {too_high[:5]}{' ...' if len(too_high) > 5 else ''} do not exist. Fix: set "
            "model.num_classes to the number of rows of the checkpoint's head, or correct dataset.class_map.")
    per_label = Counter(labels)  # one pass: O(N + C), not a scan of the labels per class
    counts = [per_label.get(c, 0) for c in range(C)]
    rows = decomposed_rows(cfg.decompose.classes, counts)
    k = cfg.decompose.k
    if k > D:
        raise InputValueError(
            f"decompose.k={k} is larger than the model's {D} feature channels ({cfg.model.arch}): expected "
            f"k <= {D}. Fix: set decompose.k to at most {D}."
        )
    short = [(c, counts[c]) for c in rows if counts[c] * H * W < k]
    if short:
        names = list(getattr(train, "classes", range(C)))
        shown = ", ".join(f"class {c} ({names[c] if c < len(names) else c!r}): {n} images" for c, n in short[:5])
        # rows holds only classes with images (decomposed_rows refuses empty ones), so this bound is >= 1.
        raise InputValueError(
            f"{len(short)} classes have too few training images for decompose.k={k}: each image gives {H}x{W} = "
            f"{H * W} feature rows and k prototypes need at least k rows, so a class needs at least "
            f"{-(-k // (H * W))} images; got {shown}{' ...' if len(short) > 5 else ''}. Fix: add images to those "
            f"classes, or lower decompose.k to at most {min(n for _, n in short) * H * W}."
        )
    return {"n_classes": C, "feature_shape": [int(H), int(W), int(D)],
            "min_class_images": min(counts[c] for c in rows), "decomposed_classes": rows}


def decomposed_rows(classes: list[int] | None, counts: list[int]) -> list[int]:
    """The head rows to decompose: ``classes`` (``decompose.classes``), checked against the per-row training
    image ``counts [C]``, or every row with at least one image (None). Ascending; raises InputValueError naming the
    rows that are outside the head or have no training image."""
    from phpn_core.errors import InputValueError

    C = len(counts)
    with_images = [c for c in range(C) if counts[c] > 0]
    if classes is None:
        if not with_images:
            raise InputValueError("the training split has no image: expected images for at least one head row. "
                                  "Fix: check dataset.root (and dataset.class_map).")
        return with_images
    outside = [c for c in classes if c >= C]
    if outside:
        raise InputValueError(
            f"decompose.classes lists rows {outside[:10]} outside the head's C={C} rows (0..{C - 1}). Fix: remove "
            "them, or set model.num_classes to the head's real size.")
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise InputValueError(
            f"decompose.classes lists rows {empty[:10]}{' ...' if len(empty) > 10 else ''} that have no training "
            f"image (rows with images: {with_images[:10]}{' ...' if len(with_images) > 10 else ''}). Fix: remove "
            "them from decompose.classes (or leave it out to decompose every row with images), or add images for "
            "them (dataset.class_map maps folders to rows).")
    return sorted(classes)


def model_class_names(cfg: RunConfig, model_rec: dict) -> list[str] | None:
    """The model's own category names (``[C]``) when it comes by torchvision weights name (``model.weights``:
    ``weights.meta["categories"]``); None otherwise, or when this phpn cannot build models by weights name."""
    weights = getattr(cfg.model, "weights", None)
    if not weights:
        return None
    try:
        from phpn_core.models.spec import ModelSpec, class_names_for
    except ImportError:
        return None
    try:
        spec = ModelSpec(arch=model_rec["arch"], weights=weights)  # the names need only the weights' metadata
    except ValueError:  # pydantic's ValidationError: weights this arch does not have (build_model says why)
        return None
    names = class_names_for(spec)
    return None if names is None else [str(n) for n in names]


def run_class_names(cfg: RunConfig, model_rec: dict, datasets=None) -> list[str]:
    """The names of the run's C head rows: the model's categories (weights by name), else the dataset's
    (ImageFolder folders through the class map, CUB, synthparts, Fashion-MNIST), ``"class <row>"`` for the rest."""
    from phpn_core.data.factory import RunDatasets, class_names_for_run

    return class_names_for_run(RunDatasets.of(cfg.dataset, datasets).train, model_rec["num_classes"],
                               model_class_names(cfg, model_rec))


PREFLIGHT_FULL = 4096  # images probed one by one before any compute; beyond, a sample of this many


def preflight_sample(paths: list, limit: int = PREFLIGHT_FULL) -> list:
    """``paths`` when at most ``limit``, else ``limit`` of them evenly spaced (first and last included): the
    pre-flight's probe stays O(limit) whatever the dataset size (0.35 ms per small JPEG here: ~1.4 s)."""
    n = len(paths)
    if n <= limit:
        return list(paths)
    return [paths[(i * (n - 1)) // (limit - 1)] for i in range(limit)]


def refuse_escaping_links(uri: str) -> None:
    """Raise StoreError when a symbolic link under the local store/registry root ``uri`` resolves outside it (S3
    URIs and missing roots pass). The root itself may be a link (e.g. to a larger disk)."""
    import os

    from phpn_core.errors import StoreError
    from phpn_core.storage.uri import parse_uri

    loc = parse_uri(uri)
    if loc.is_remote or not os.path.isdir(loc.path):
        return
    root = os.path.realpath(loc.path)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                real = os.path.realpath(p)
                if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
                    rel = os.path.relpath(p, root)
                    raise StoreError(
                        f"{rel!r} under {loc.path!r} is a symbolic link to {real!r}, outside that root: expected "
                        "every file of a feature store or registry to stay under its root (writes through the link "
                        "would land elsewhere). Fix: remove the link, or point the config at the real location."
                    )
