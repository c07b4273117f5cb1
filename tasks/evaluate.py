"""Evaluation and report tasks: read the registry entry and the test features by URI, write metrics/report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect import task

from phpn_core.config import RunConfig

from .common import pick_device
from .inputs import load_classifier


def _test_features(store):
    import torch

    feats, labels = [], []
    for c in store.classes:
        f = store.class_features(c)
        feats.append(f)
        labels.append(torch.full((f.shape[0],), c, dtype=torch.long))
    return torch.cat(feats), torch.cat(labels)


@task(cache_policy=NO_CACHE, name="evaluate-parity", task_run_name="evaluate-parity-{entry_id}")
def evaluate_parity(*, test_features_uri: str, registry_uri: str, linear_uri: str, entry_id: str,
                    classes: list[int] | None = None) -> dict:
    """Accuracy of the original and the decomposed head on the stored test features, max logit difference,
    max head-reconstruction error. ``classes``: the decomposed head rows; accuracy is over the test images of those
    classes (argmax over all C logits), the logit difference over every test image and all C logits."""
    from phpn_core.evaluation.parity import head_reconstruction_error
    from phpn_core.storage.registry import PrototypeRegistry
    import torch

    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.tensorio import read_tensors

    head, _ = PrototypeRegistry(registry_uri).load(entry_id)
    linear, _ = read_tensors(linear_uri)
    W, b = linear["weight"].float(), linear["bias"].float()
    F, y = _test_features(FeatureStore.open(test_features_uri))
    fmap = F.permute(0, 3, 1, 2)  # [n, D, H, W]
    orig = F.mean((1, 2)) @ W.T + b
    dec = head(fmap)
    sel = torch.isin(y, torch.tensor(classes, dtype=y.dtype)) if classes is not None else torch.ones_like(y, dtype=torch.bool)
    n_sel = int(sel.sum())
    return {
        "accuracy_original": float((orig.argmax(1) == y)[sel].float().mean()) if n_sel else None,
        "accuracy_decomposed": float((dec.argmax(1) == y)[sel].float().mean()) if n_sel else None,
        "max_abs_logit_diff": float((orig - dec).abs().max()),
        "max_head_reconstruction_error": head_reconstruction_error(head, W),
        "n_test_images": n_sel,
    }


@task(cache_policy=NO_CACHE, name="evaluate-protoeval", task_run_name="evaluate-protoeval-{entry_id}")
def evaluate_protoeval(*, cfg: RunConfig, model_rec: dict, registry_uri: str, entry_id: str, out_dir: str,
                       datasets=None) -> dict:
    """ProtoEval consistency and stability (where the test split has part keypoints) and the keypoint-free
    metrics (deletion/insertion AUC, box stability, redundancy) of the prototypes and of the baselines."""
    from phpn_core.data.factory import RunDatasets
    from phpn_core.evaluation.suite import evaluate_all
    from phpn_core.storage.registry import PrototypeRegistry


    datasets = RunDatasets.of(cfg.dataset, datasets)
    ds = datasets.test
    if not getattr(ds, "part_names", None) and not cfg.evaluate.keypoint_free:
        return {"consistency": None, "stability": None, "note": f"{cfg.dataset.kind} has no part keypoints"}
    train = datasets.train if cfg.evaluate.baselines else None
    registry = PrototypeRegistry(registry_uri)
    head, _ = registry.load(entry_id)
    arrays = registry.load_arrays(entry_id)
    _, features, _, _ = load_classifier(model_rec)
    ev = cfg.evaluate
    res = evaluate_all(features, head, ds, initial=arrays["initial"], train_dataset=train,
                       box_half_size=ev.box_half_size, threshold=ev.threshold, noise_std=ev.noise_std,
                       noise_clip=ev.noise_clip, seed=ev.seed, baselines=ev.baselines,
                       device=pick_device(cfg.compute.device), keypoint_free_metrics=ev.keypoint_free,
                       keypoint_free_images=ev.keypoint_free_images, keypoint_free_steps=ev.keypoint_free_steps)
    Path(out_dir, "evaluation.json").write_text(json.dumps(res["details"], indent=1))
    return res["summary"]


@task(cache_policy=NO_CACHE, name="build-report", task_run_name="report-{entry_id}")
def build_report_task(*, cfg: RunConfig, model_rec: dict, registry_uri: str, entry_id: str, train_features_uri: str,
                      metrics: dict, out_dir: str, datasets=None) -> dict:
    """The HTML report (heatmaps, galleries, contributions, metric table) and its PNGs under ``out_dir``."""
    from phpn_core.data.factory import RunDatasets
    from phpn_core.report.html import build_report
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.report.class_pages import build_class_pages
    from phpn_core.storage.feature_store import FeatureStore


    t = time.perf_counter()
    registry = PrototypeRegistry(registry_uri)
    head, info = registry.load(entry_id)
    _, features, _, _ = load_classifier(model_rec)
    datasets = RunDatasets.of(cfg.dataset, datasets)
    test = datasets.test
    # The decomposed rows that have test images (a 1000-class head explained on 5 classes shows those 5), by name.
    rows = info.metadata.get("decomposed_classes") or list(range(info.n_classes))
    present = {int(v) for v in test.labels}
    shown = [c for c in rows if c in present][:10] or None
    names = info.metadata.get("class_names")
    names = names if isinstance(names, list) and len(names) == info.n_classes else None
    train, train_store, device = datasets.train, FeatureStore.open(train_features_uri), \
        pick_device(cfg.compute.device)
    path = build_report(
        out_dir=out_dir, head=head, features=features, test_dataset=test, train_dataset=train,
        train_store=train_store, metrics=metrics, title=f"phpn: {cfg.name}", device=device, classes=shown,
        class_names=names,
    )
    # Every decomposed class, reachable: a paged, searchable index and one bounded page per class (in parallel).
    index = build_class_pages(
        out_dir=out_dir, head=head, features=features, test_dataset=test, train_dataset=train,
        train_store=train_store, class_names=names, classes=rows, device=device, title=f"phpn: {cfg.name}",
        per_class_metrics=_per_class_metrics(registry.load_arrays(entry_id), rows, metrics,
                                             Path(out_dir, "evaluation.json")),
    )
    return {"report": str(path), "class_index": str(index), "seconds": round(time.perf_counter() - t, 3)}


def _per_class_metrics(arrays: dict, rows: list[int], metrics: dict, evaluation_json: Path) -> dict:
    """``{column: {class: value}}`` for the class pages: NMF relative error and head error of the decomposed
    ``rows`` (registry arrays ``[C]``), each class's k where they differ (``decompose.k: auto``), and ProtoEval consistency/stability and the keypoint-free metrics
    (insertion/deletion AUC, box stability, redundancy) per class when this run computed them."""
    out = {column: {c: float(arrays[name][c]) for c in rows}
           for name, column in (("rel_error", "nmf_rel_error"), ("head_error", "head_error")) if name in arrays}
    slots = arrays["prototypes"].shape[1] if "prototypes" in arrays else None
    if "k" in arrays and any(int(arrays["k"][c]) != slots for c in rows):  # decompose.k: auto lowered some
        out["k"] = {c: int(arrays["k"][c]) for c in rows}
    if evaluation_json.is_file() and (metrics.get("consistency") is not None
                                      or metrics.get("insertion_auc") is not None):  # written by this run
        ours = json.loads(evaluation_json.read_text()).get("phpn") or {}
        for name in ("consistency", "stability"):
            values = ours.get(f"{name}_per_class")
            if isinstance(values, list) and len(values) == len(ours.get("classes") or []):
                out[name] = {int(c): v for c, v in zip(ours["classes"], values)}
        per_class = (ours.get("keypoint_free") or {}).get("per_class") or []
        for name in ("insertion_auc", "deletion_auc", "box_stability", "redundancy"):
            values = {int(r["class_index"]): r.get(name) for r in per_class if isinstance(r, dict)}
            if values:
                out[name] = values
    return out
