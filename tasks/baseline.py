"""The ProtoPNet baseline as a task: train it on the run's trunk and data, score it with the same evaluation code as
phpn, publish it to the registry (kind ``"protopnet"``) with its metrics, return a small record."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from phpn_core.config import RunConfig

from .common import pick_device
from .inputs import load_classifier


@task(cache_policy=NO_CACHE, name="train-protopnet", task_run_name="protopnet-{cfg.model.arch}-{cfg.dataset.kind}")
def train_protopnet_baseline(cfg: RunConfig, model_rec: dict, registry_uri: str, out_dir: str,
                             datasets=None) -> dict:
    """Train ProtoPNet (``cfg.protopnet``) on the classifier's trunk, initialised from its trained weights; evaluate
    accuracy (and ProtoEval where the dataset has keypoints, with ``cfg.evaluate``'s settings) on the test split;
    publish and record the metrics. Writes ``out_dir/protopnet_metrics.json``; returns the metrics."""
    from phpn_core.data.factory import RunDatasets
    from phpn_core.evaluation.parity import accuracy_parity
    from phpn_core.method.head import PartPrototypeHead
    from phpn_core.protopnet import ProtoPNetConfig, protopnet_accuracy, protopnet_protoeval, train_protopnet
    from phpn_core.protopnet.entry import protopnet_metadata, protopnet_tensors
    from phpn_core.storage.registry import PrototypeRegistry

    datasets = RunDatasets.of(cfg.dataset, datasets)
    train, test = datasets.train, datasets.test
    device = pick_device(cfg.compute.device)
    _, features, weight, bias = load_classifier(model_rec)
    C = int(weight.shape[0])
    pcfg = ProtoPNetConfig(**cfg.protopnet.options())
    res = train_protopnet(features, train, num_classes=C, config=pcfg, seed=cfg.protopnet.seed, device=device,
                          progress=True)
    t0 = time.perf_counter()
    linear = PartPrototypeHead(weight.detach().unsqueeze(1), bias.detach())  # the CNN's own head, k = 1
    metrics: dict = {
        "kind": "protopnet", "accuracy": protopnet_accuracy(res.model, test, device=device),
        "accuracy_cnn": accuracy_parity(features, weight, bias, linear, test, device=device)["accuracy_original"],
        "prototypes_per_class": res.model.prototypes_per_class, "prototype_dim": res.model.prototype_dim,
        "n_classes": C, "train_seconds": round(res.seconds, 3), "phase_seconds": res.phase_seconds,
        "history_last": {phase: rows[-1] for phase, rows in res.history.items() if rows},
    }
    ev = cfg.evaluate
    if ev.enabled and getattr(test, "part_names", None):
        pe = protopnet_protoeval(res.model, test, device=device, box_half_size=ev.box_half_size,
                                 threshold=ev.threshold, noise_std=ev.noise_std, noise_clip=ev.noise_clip, seed=ev.seed)
        metrics.update({"consistency": pe.consistency, "stability": pe.stability})
    else:
        metrics.update({"consistency": None, "stability": None})
    metrics["evaluation_seconds"] = round(time.perf_counter() - t0, 3)
    registry = PrototypeRegistry(registry_uri)
    info = registry.publish_protopnet(
        model=f"protopnet-{cfg.model.arch.replace(':', '-')}", dataset=cfg.dataset.kind,
        config_digest=cfg.protopnet_digest(), tensors=protopnet_tensors(res.model, res.push), n_classes=C,
        prototypes_per_class=res.model.prototypes_per_class, prototype_dim=res.model.prototype_dim,
        metadata={"config": json.loads(cfg.model_dump_json()), "run": cfg.name, "model_record": model_rec,
                  "protopnet": protopnet_metadata(res.model, res.push, config=pcfg.to_dict()),
                  "class_names": [str(n) for n in getattr(train, "classes", [])][:C] or None},
    )
    metrics.update({"entry_id": info.entry_id, "version": info.version, "registry": registry_uri})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "protopnet_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    registry.record_metrics(info.entry_id, metrics, version=info.version)
    return metrics
