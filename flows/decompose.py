"""decompose_flow: extract -> fan shards out to Ray -> publish -> evaluate -> report (composition only)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner

from phpn_core.config import RunConfig
from tasks.decompose import decompose_shard, publish_entry
from tasks.evaluate import build_report_task, evaluate_parity, evaluate_protoeval
from tasks.prepare import check_inputs, extract_split, prepare_model

METRIC_KEYS = ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff", "max_head_reconstruction_error",
               "consistency", "stability", "n_classes", "k", "seconds")


@task(cache_policy=NO_CACHE, name="write-linear-head", task_run_name="write-linear-head")
def write_linear_head(model_rec: dict, uri: str) -> dict:
    """Write the classifier's linear head (weight [C, D], bias [C]) by URI, for the shard tasks."""
    from phpn_core.storage.tensorio import write_tensors
    from tasks.prepare import load_classifier

    _, _, weight, bias = load_classifier(model_rec)
    write_tensors(uri, {"weight": weight, "bias": bias})
    return {"uri": uri, "n_classes": int(weight.shape[0]), "dim": int(weight.shape[1])}


def _cluster_has_gpus() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        return False


SHARD_PIN_AMOUNT = 0.001  # a sliver of a node's custom resource: pins the shard there without limiting concurrency


def _shard_pins(names: list[str], n_shards: int) -> list[str | None]:
    """Round-robin custom-resource pin per shard (``compute.shard_resources``); None everywhere when unset.

    A resource no node offers would leave its shards pending forever, so it is refused here.
    """
    if not names:
        return [None] * n_shards
    import ray

    offered = ray.cluster_resources() if ray.is_initialized() else {}
    missing = [r for r in names if offered.get(r, 0) <= 0]
    if missing:
        from phpn_core.errors import ConfigError

        raise ConfigError(
            f"compute.shard_resources names Ray resources no node offers: {missing}; the cluster offers "
            f"{sorted(k for k in offered if not k.startswith('node:'))}. Start nodes with "
            "`ray start --resources '{\"NAME\": 1}'` or drop compute.shard_resources.")
    return [names[i % len(names)] for i in range(n_shards)]


def _entry_id(cfg: RunConfig, model_rec: dict) -> str:
    from phpn_core.storage.registry import PrototypeRegistry

    digest = hashlib.sha256((cfg.digest() + model_rec["digest"]).encode()).hexdigest()[:16]
    return PrototypeRegistry.entry_id(cfg.model.arch, cfg.dataset.kind, cfg.decompose.k, digest)


@flow(name="phpn-decompose", flow_run_name="decompose-{cfg.name}-{cfg.model.arch}-{cfg.dataset.kind}-k{cfg.decompose.k}",
      task_runner=RayTaskRunner(), log_prints=True)
def decompose_flow(cfg: RunConfig, out_dir: str) -> dict:
    """Decompose a classifier's head into part-prototypes, publish them, evaluate them, and report.

    Writes ``out_dir/features/``, ``out_dir/registry/`` (unless the config points elsewhere),
    ``out_dir/report.html`` and ``out_dir/metrics.json``; returns the metrics.
    """
    t0 = time.perf_counter()
    with tags("phpn", f"model:{cfg.model.arch}", f"dataset:{cfg.dataset.kind}", f"k:{cfg.decompose.k}", f"run:{cfg.name}"):
        return _decompose(cfg, out_dir, t0)


def _decompose(cfg: RunConfig, out_dir: str, t0: float) -> dict:
    from prefect_ray.context import remote_options

    log = get_run_logger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features_root = cfg.storage.features_uri or str(out / "features")
    registry_uri = cfg.storage.registry_uri or str(out / "registry")

    check_inputs(cfg, out_dir)  # in the driver, before any compute: bad checkpoints, images, too-small classes refused here
    model_rec = prepare_model(cfg, out_dir)
    train = extract_split(cfg, model_rec, "train", f"{features_root}/train.zarr")
    test = extract_split(cfg, model_rec, "test", f"{features_root}/test.zarr")
    entry_id = _entry_id(cfg, model_rec)
    linear_uri = f"{registry_uri}/inputs/{entry_id}/linear.safetensors"
    linear = write_linear_head(model_rec, linear_uri)
    C = linear["n_classes"]

    n = cfg.compute.classes_per_task
    shards = [list(range(i, min(C, i + n))) for i in range(0, C, n)]
    label = f"{cfg.model.arch}-{cfg.dataset.kind}"
    dec = cfg.decompose
    options = {"normalization": dec.normalization, "target": dec.target, "refine_ridge": dec.refine_ridge,
               "refine_iter": dec.refine_iter, "nmf_options": dec.nmf_options()}
    # max_retries: Ray re-runs a shard whose worker process died (SIGKILL, OOM, node loss); staging is idempotent.
    resources = {"num_cpus": cfg.compute.cpus_per_task, "max_retries": 3}
    if cfg.compute.gpus_per_task > 0 and _cluster_has_gpus():
        resources["num_gpus"] = cfg.compute.gpus_per_task
    progress_id = create_progress_artifact(progress=0.0, key=None, description=f"shards of {entry_id} done")
    t_fan = time.perf_counter()
    pins = _shard_pins(cfg.compute.shard_resources, len(shards))
    futures = []
    for shard, pin in zip(shards, pins):
        with remote_options(**resources, **({"resources": {pin: SHARD_PIN_AMOUNT}} if pin else {})):
            futures.append(decompose_shard.submit(
                features_uri=f"{features_root}/train.zarr", registry_uri=registry_uri, linear_uri=linear_uri,
                entry_id=entry_id, classes=shard, k=dec.k, seed=dec.seed, options=options,
                device=cfg.compute.device, label=label))
    records = []
    for fut in as_completed(futures):
        records.append(fut.result())
        update_progress_artifact(progress_id, progress=100.0 * len(records) / len(futures))
    t_fan = time.perf_counter() - t_fan
    computed = sorted(c for r in records for c in r["computed"])
    log.info("decomposition: %d classes computed, %d reused, %d shards in %.1f s",
             len(computed), C - len(computed), len(shards), t_fan)

    publish_entry(registry_uri=registry_uri, linear_uri=linear_uri, entry_id=entry_id, n_classes=C,
                         metadata={"config": json.loads(cfg.model_dump_json()), "run": cfg.name,
                                   "features": {"train": train["uri"], "train_fingerprint": train["fingerprint"],
                                                "test": test["uri"], "test_fingerprint": test["fingerprint"]},
                                   "model_checkpoint_digest": model_rec["digest"]})
    metrics: dict = evaluate_parity(test_features_uri=f"{features_root}/test.zarr", registry_uri=registry_uri,
                                    linear_uri=linear_uri, entry_id=entry_id)
    if cfg.evaluate.enabled:
        metrics.update(evaluate_protoeval(cfg=cfg, model_rec=model_rec, registry_uri=registry_uri,
                                          entry_id=entry_id, out_dir=out_dir))
    else:
        metrics.update({"consistency": None, "stability": None})
    metrics.update({"n_classes": C, "k": dec.k, "entry_id": entry_id, "registry": registry_uri,
                    "classes_computed": len(computed), "classes_reused": C - len(computed),
                    "decomposition_seconds": round(t_fan, 3),
                    "shard_workers": sorted({f"{r['host']}:{r['pid']}" for r in records}),
                    "shard_pins": [p for p in pins if p]})
    if cfg.evaluate.report:
        metrics["report"] = build_report_task(cfg=cfg, model_rec=model_rec, registry_uri=registry_uri,
                                              entry_id=entry_id, train_features_uri=f"{features_root}/train.zarr",
                                              metrics=metrics, out_dir=out_dir)["report"]
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _publish_artifacts(cfg, entry_id, metrics, records, registry_uri)
    return metrics


def _publish_artifacts(cfg: RunConfig, entry_id: str, metrics: dict, records: list[dict], registry_uri: str) -> None:
    from phpn_core.storage.registry import PrototypeRegistry

    arrays = PrototypeRegistry(registry_uri).load_arrays(entry_id)
    rows = []
    for c in range(arrays["rel_error"].shape[0]):
        row = {"class": c, "nmf_rel_error": round(float(arrays["rel_error"][c]), 5),
               "head_error": float(arrays["head_error"][c])}
        for name in ("nmf_iter", "refine_iter", "refine_objective"):
            if name in arrays:
                row[name] = round(float(arrays[name][c]), 5)
        rows.append(row)
    key = "".join(ch if ch.isalnum() else "-" for ch in f"phpn-{cfg.name}").lower()
    create_table_artifact(rows, key=f"{key}-classes", description=f"Per-class diagnostics of {entry_id}")
    lines = [f"# phpn run `{cfg.name}`", "", f"Registry entry `{entry_id}` in `{registry_uri}`", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {metrics.get(k)} |" for k in METRIC_KEYS]
    if metrics.get("report"):
        lines += ["", f"Report: [{metrics['report']}](file://{metrics['report']})"]
    workers = sorted({(r["host"], r["pid"]) for r in records})
    lines += ["", f"Shards ran in {len(workers)} worker process(es)."]
    create_markdown_artifact("\n".join(lines), key=f"{key}-metrics", description="phpn metrics")
    png = Path(metrics["report"]).parent / "report_png" / "class-000-heatmaps.png" if metrics.get("report") else None
    if png is not None and png.is_file():
        import base64

        data = base64.b64encode(png.read_bytes()).decode()
        create_markdown_artifact(f"# Prototype heatmaps, class 0\n\n![class 0 heatmaps](data:image/png;base64,{data})\n\n"
                                 f"File: `{png}`", key=f"{key}-heatmaps", description="prototype heatmaps (class 0)")
