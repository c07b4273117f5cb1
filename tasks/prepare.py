"""Model preparation and feature extraction tasks."""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect import task

from phpn_core.config import RunConfig

from .common import pick_device, retry_on_io


@task(cache_policy=NO_CACHE, name="prepare-model", task_run_name="prepare-model-{cfg.model.arch}")
def prepare_model(cfg: RunConfig, out_dir: str) -> dict:
    """The classifier's spec and checkpoint digest; trains the synthparts CNN when no checkpoint is given
    (once: a finished checkpoint under ``out_dir`` is reused)."""
    from phpn_core.data.factory import build_dataset
    from phpn_core.modelspec import checkpoint_digest

    n_classes = cfg.model.num_classes
    ckpt = cfg.model.checkpoint
    trained = False
    if cfg.model.arch == "synthparts_cnn" and ckpt is None:
        from phpn_core.models import save_model, train_synthparts_cnn

        path = Path(out_dir) / "model" / "synthparts_cnn.safetensors"
        if not path.is_file():
            train = build_dataset(cfg.dataset, "train")
            model = train_synthparts_cnn(train, epochs=cfg.model.train_epochs, seed=cfg.dataset.seed,
                                         device=pick_device(cfg.compute.device), progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(model, path)
            trained = True
        ckpt = str(path)
    if n_classes is None:
        n_classes = len(build_dataset(cfg.dataset, "test").classes)
    return {"arch": cfg.model.arch, "checkpoint": ckpt, "num_classes": n_classes,
            "input_size": cfg.dataset.image_size, "digest": checkpoint_digest(ckpt), "trained": trained}


def load_classifier(model_rec: dict):
    from phpn_core.backbones import split_classifier
    from phpn_core.modelspec import ModelSpec, build_model

    spec = ModelSpec(arch=model_rec["arch"], checkpoint=model_rec["checkpoint"],
                     num_classes=model_rec["num_classes"], input_size=model_rec["input_size"])
    model = build_model(spec).eval()
    return model, *split_classifier(model)


@task(cache_policy=NO_CACHE, name="extract-features", task_run_name="extract-{split}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def extract_split(cfg: RunConfig, model_rec: dict, split: str, uri: str) -> dict:
    """Extract (or resume, or reuse) the ``split`` features of the configured dataset into the store at ``uri``."""
    from phpn_core.data.factory import build_dataset
    from phpn_core.extract import extract_features

    _, features, _, _ = load_classifier(model_rec)
    ds = build_dataset(cfg.dataset, split)
    res = extract_features(
        features, ds, uri, model=model_rec["arch"], checkpoint_digest=model_rec["digest"], split=split,
        input_size=cfg.dataset.image_size, dataset_name=cfg.dataset.kind, dtype=cfg.compute.feature_dtype,
        batch_size=cfg.compute.batch_size, device=pick_device(cfg.compute.device), progress=True,
    )
    return res.record()
