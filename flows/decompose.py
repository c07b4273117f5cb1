"""decompose_flow: extract -> fan shards out to Ray -> publish -> evaluate -> report (composition only)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner

from phpn_core.config import RunConfig
from tasks.decompose import decompose_shard, publish_entry, record_entry_metrics
from tasks.evaluate import build_report_task, evaluate_parity, evaluate_protoeval
from tasks.prepare import check_inputs, extract_split, prepare_model, run_class_names

METRIC_KEYS = ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff", "max_head_reconstruction_error",
               "consistency", "stability", "n_classes", "k", "seconds")
CLASS_EXTREMES = 10  # the per-class Prefect table of `phpn run`: this many worst and best classes, whatever C


@task(cache_policy=NO_CACHE, name="write-linear-head", task_run_name="write-linear-head")
def write_linear_head(model_rec: dict, uri: str) -> dict:
    """Write the classifier's linear head (weight [C, D], bias [C]) by URI, for the shard tasks."""
    from phpn_core.storage.tensorio import write_tensors
    from tasks.inputs import load_classifier

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
    _tag_flow_run("phpn", f"model:{cfg.model.arch}", f"dataset:{cfg.dataset.kind}", f"k:{cfg.decompose.k}",
                  f"run:{cfg.name}")
    return _decompose(cfg, out_dir, t0)


def _tag_flow_run(*labels: str) -> None:
    """Add ``labels`` to the running flow run's tags (the UI filters runs by model, dataset, k and run name).

    Not ``with prefect.tags(...)`` around the body: that tags every *task* run, and Prefect then acquires tag
    concurrency slots for each of them; in a Ray worker that made a shard start up to ~2 s late, every other flow
    run or so (measured on the demo: the fan-out of two shards took 2.5-3.3 s instead of 0.9 s)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, tags=sorted(set(ctx.flow_run.tags or ()) | set(labels)))


def _decompose(cfg: RunConfig, out_dir: str, t0: float) -> dict:

    log = get_run_logger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features_root = cfg.storage.features_uri or str(out / "features")
    registry_uri = cfg.storage.registry_uri or str(out / "registry")

    from phpn_core.data.factory import RunDatasets

    datasets = RunDatasets(cfg.dataset)  # each split built once in the driver, read by every step below
    # In the driver, before any compute: bad checkpoints, images, too-small classes are refused here.
    checked = check_inputs(cfg, out_dir, datasets)
    model_rec = prepare_model(cfg, out_dir, datasets)
    train = extract_store(cfg, model_rec, "train", f"{features_root}/train.zarr", datasets)
    test = extract_store(cfg, model_rec, "test", f"{features_root}/test.zarr", datasets)
    entry_id = _entry_id(cfg, model_rec)
    linear_uri = f"{registry_uri}/inputs/{entry_id}/linear.safetensors"
    linear = write_linear_head(model_rec, linear_uri)
    C = linear["n_classes"]
    rows = checked["decomposed_classes"]  # decompose.classes, or every head row with training images
    class_names = run_class_names(cfg, model_rec, datasets)

    label = f"{cfg.model.arch}-{cfg.dataset.kind}"
    dec = cfg.decompose
    pins = _shard_pins(cfg.compute.shard_resources, -(-len(rows) // cfg.compute.classes_per_task))
    records, t_fan = fan_out_shards(cfg, classes=rows, features_uri=f"{features_root}/train.zarr",
                                    registry_uri=registry_uri, linear_uri=linear_uri, entry_id=entry_id, label=label)
    computed = sorted(c for r in records for c in r["computed"])
    log.info("decomposition: %d classes computed, %d reused, %d shards in %.1f s",
             len(computed), len(rows) - len(computed), len(records), t_fan)

    published = publish_entry(registry_uri=registry_uri, linear_uri=linear_uri, entry_id=entry_id, n_classes=C,
                         metadata={"config": json.loads(cfg.model_dump_json()), "run": cfg.name,
                                   "features": {"train": train["uri"], "train_fingerprint": train["fingerprint"],
                                                "test": test["uri"], "test_fingerprint": test["fingerprint"]},
                                   "model_checkpoint_digest": model_rec["digest"],
                                   "class_names": class_names, "decomposed_classes": rows},
                         decomposed=rows)
    metrics: dict = evaluate_parity(test_features_uri=f"{features_root}/test.zarr", registry_uri=registry_uri,
                                    linear_uri=linear_uri, entry_id=entry_id, classes=rows)
    if cfg.evaluate.enabled:
        metrics.update(evaluate_protoeval(cfg=cfg, model_rec=model_rec, registry_uri=registry_uri,
                                          entry_id=entry_id, out_dir=out_dir, datasets=datasets))
    else:
        metrics.update({"consistency": None, "stability": None})
    metrics.update({"n_classes": C, "k": dec.k, "entry_id": entry_id, "registry": registry_uri,
                    "decomposed_classes": rows, "decomposed_class_names": [class_names[c] for c in rows],
                    "classes_computed": len(computed), "classes_reused": len(rows) - len(computed),
                    "decomposition_seconds": round(t_fan, 3),
                    "shard_workers": sorted({f"{r['host']}:{r['pid']}" for r in records}),
                    "shard_threads": sorted({r.get("torch_threads") for r in records if r.get("torch_threads")}),
                    "shard_pins": [p for p in pins if p]})
    if dec.k_auto:
        metrics.update(_k_summary(registry_uri, entry_id, rows))
    if cfg.evaluate.report:
        metrics["report"] = build_report_task(cfg=cfg, model_rec=model_rec, registry_uri=registry_uri,
                                              entry_id=entry_id, train_features_uri=f"{features_root}/train.zarr",
                                              metrics=metrics, out_dir=out_dir, datasets=datasets)["report"]
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))  # first: nothing is lost
    record_entry_metrics(registry_uri=registry_uri, entry_id=entry_id, version=published["version"], metrics=metrics)
    _publish_artifacts(cfg, entry_id, metrics, records, registry_uri, rows=rows, class_names=class_names)
    return metrics


def _k_summary(registry_uri: str, entry_id: str, rows: list[int]) -> dict:
    """With ``decompose.k: auto``: which k each decomposed class got (``k_per_class``, in ``rows`` order), their
    mean and how many classes got each k."""
    from phpn_core.storage.registry import PrototypeRegistry

    ks = PrototypeRegistry(registry_uri).load_arrays(entry_id)["k"][rows].long().tolist()
    return {"k_auto": True, "k_per_class": ks, "k_mean": round(sum(ks) / max(len(ks), 1), 4),
            "k_histogram": {str(v): ks.count(v) for v in sorted(set(ks))}}


def class_extremes(rel_error: list[float], classes: list[int], n: int) -> list[tuple[int, str]]:
    """The ``n`` worst classes (highest ``rel_error[c]``, ties by index) then the up to ``n`` best (lowest, listed
    from the highest of them to the lowest) among ``classes``, as ``(class, "worst" | "best")``; never a class
    twice, at most ``2 n`` rows whatever ``len(classes)``."""
    order = sorted(classes, key=lambda c: (-float(rel_error[c]), c))
    top = min(n, len(order))
    return [(c, "worst") for c in order[:top]] + [(c, "best") for c in order[max(top, len(order) - top):]]


def _publish_artifacts(cfg: RunConfig, entry_id: str, metrics: dict, records: list[dict], registry_uri: str, *,
                       rows: list[int] | None = None, class_names: list[str] | None = None) -> None:
    from phpn_core.storage.registry import PrototypeRegistry

    arrays = PrototypeRegistry(registry_uri).load_arrays(entry_id)
    decomposed = rows if rows is not None else list(range(arrays["rel_error"].shape[0]))
    # Bounded whatever C (as _store_artifacts): the CLASS_EXTREMES worst and best classes by NMF relative error;
    # every class is in the report's class index (classes/index.html).
    picks = class_extremes(arrays["rel_error"].tolist(), decomposed, CLASS_EXTREMES)
    top = sum(rank == "worst" for _, rank in picks)
    rows = []
    for c, rank in picks:
        row = {"class": c, "rank": rank, "name": class_names[c] if class_names else f"class {c}",
               "nmf_rel_error": round(float(arrays["rel_error"][c]), 5),
               "head_error": float(arrays["head_error"][c])}
        for name in ("k", "redundancy", "nmf_iter", "refine_iter", "refine_objective"):
            if name in arrays:
                row[name] = round(float(arrays[name][c]), 5)
        rows.append(row)
    key = "".join(ch if ch.isalnum() else "-" for ch in f"phpn-{cfg.name}").lower()
    create_table_artifact(rows, key=f"{key}-classes", description=f"Per-class diagnostics of {entry_id}: worst and "
                                                                  f"best classes (NMF relative error) of {len(decomposed)}")
    lines = [f"# phpn run `{cfg.name}`", "", f"Registry entry `{entry_id}` in `{registry_uri}`", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {metrics.get(k)} |" for k in METRIC_KEYS]
    shown = ", ".join(f"{c} {class_names[c]}" if class_names else str(c) for c in decomposed[:20])
    lines += ["", f"Decomposed classes ({len(decomposed)}): {shown}{' ...' if len(decomposed) > 20 else ''}"]
    if metrics.get("report"):
        lines += ["", f"Report: [{metrics['report']}](file://{metrics['report']})"]
        index = Path(metrics["report"]).parent / "classes" / "index.html"
        if index.is_file():
            lines += ["", f"All {len(decomposed)} classes (index searchable by name, one page per class): "
                          f"[{index}](file://{index})"]
    lines += ["", f"Per-class table: the {top} worst and {len(picks) - top} best of {len(decomposed)} classes by "
                  "NMF relative error."]
    workers = sorted({(r["host"], r["pid"]) for r in records})
    lines += ["", f"Shards ran in {len(workers)} worker process(es)."]
    create_markdown_artifact("\n".join(lines), key=f"{key}-metrics", description="phpn metrics")
    first = decomposed[0] if decomposed else 0
    title = f"class {first}" + (f" ({class_names[first]})" if class_names else "")
    png = Path(metrics["report"]).parent / "report_png" / f"class-{first:03d}-heatmaps.png" if metrics.get("report") else None
    if png is not None and png.is_file():
        import base64

        data = base64.b64encode(png.read_bytes()).decode()
        create_markdown_artifact(f"# Prototype heatmaps, {title}\n\n![{title} heatmaps](data:image/png;base64,{data})\n\n"
                                 f"File: `{png}`", key=f"{key}-heatmaps", description=f"prototype heatmaps ({title})")


# -- decomposing a feature store someone else extracted: `phpn decompose FEATURES_URI --head HEAD --k K` ------------


def fan_out_shards(cfg: RunConfig, *, classes: list[int], features_uri: str, registry_uri: str, linear_uri: str,
                   entry_id: str, label: str, progress_key: str | None = None) -> tuple[list[dict], float]:
    """Submit ``classes`` in shards of ``compute.classes_per_task`` to Ray (``num_gpus`` where the cluster has GPUs,
    round-robin pins), gather the shard records; returns ``(records, seconds)``. Call inside a flow."""
    from prefect_ray.context import remote_options

    n = cfg.compute.classes_per_task
    shards = [classes[i:i + n] for i in range(0, len(classes), n)]
    dec = cfg.decompose
    options = dec.head_options()
    resources = {"num_cpus": cfg.compute.cpus_per_task, "max_retries": 3}
    if cfg.compute.gpus_per_task > 0 and _cluster_has_gpus():
        resources["num_gpus"] = cfg.compute.gpus_per_task
    progress_id = create_progress_artifact(progress=0.0, key=progress_key, description=f"shards of {entry_id} done")
    t = time.perf_counter()
    pins = _shard_pins(cfg.compute.shard_resources, len(shards))
    futures = []
    for shard, pin in zip(shards, pins):
        with remote_options(**resources, **({"resources": {pin: SHARD_PIN_AMOUNT}} if pin else {})):
            futures.append(decompose_shard.submit(
                features_uri=features_uri, registry_uri=registry_uri, linear_uri=linear_uri, entry_id=entry_id,
                classes=shard, k=dec.k, seed=dec.seed, options=options, device=cfg.compute.device, label=label))
    records = []
    step = max(1, len(futures) // 50)  # at most ~50 progress updates, however many shards
    for fut in as_completed(futures):
        records.append(fut.result())
        if len(records) % step == 0 or len(records) == len(futures):
            update_progress_artifact(progress_id, progress=100.0 * len(records) / len(futures))
    return records, time.perf_counter() - t


@flow(name="phpn-decompose-store", flow_run_name="decompose-store-{cfg.name}-k{cfg.decompose.k}",
      task_runner=RayTaskRunner(), log_prints=True)
def decompose_store_flow(cfg: RunConfig, features_uri: str, head_uri: str, out_dir: str,
                         test_features_uri: str | None = None) -> dict:
    """Decompose the linear head ``head_uri`` (safetensors ``weight [C, D]``, ``bias [C]``) over the features of
    an existing store (``FeatureStore.create`` + ``write_chunk``): no model, no images.

    The same shard fan-out to Ray and the same registry entry as :func:`decompose_flow` (``cfg.decompose`` and
    ``cfg.compute`` apply; ``cfg.decompose.classes`` picks head rows). Writes ``out_dir/registry/`` (unless
    ``cfg.storage.registry_uri``) and ``out_dir/metrics.json`` (``n_classes``, ``k``,
    ``max_head_reconstruction_error``, ``seconds``, parity on ``test_features_uri`` when given, per-stage seconds);
    returns the metrics. The driver reads only the stores' metadata and the head: its memory does not grow with the
    features."""
    t0 = time.perf_counter()
    _tag_flow_run("phpn", "decompose-store", f"k:{cfg.decompose.k}", f"run:{cfg.name}")
    return _decompose_store(cfg, features_uri, head_uri, out_dir, test_features_uri, t0)


def _decompose_store(cfg: RunConfig, features_uri: str, head_uri: str, out_dir: str,
                     test_features_uri: str | None, t0: float) -> dict:
    from tasks.decompose import evaluate_store_parity, prepare_store_inputs

    log = get_run_logger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    registry_uri = cfg.storage.registry_uri or str(out / "registry")
    stages: dict[str, float] = {}
    t = time.perf_counter()
    dec = cfg.decompose
    identity = {"decompose": dec.model_dump(mode="json", exclude={"classes"})}
    # A Ray task too: the driver never holds the head (it reads, checks, hashes and copies it; several copies at once).
    inputs = prepare_store_inputs.submit(
        features_uri=features_uri, head_uri=head_uri, registry_uri=registry_uri, k=dec.k, identity=identity,
        classes=dec.classes, test_features_uri=test_features_uri).result()
    stages["inputs"] = time.perf_counter() - t
    entry_id, linear_uri, C = inputs["entry_id"], inputs["linear_uri"], inputs["n_classes"]
    records, stages["decomposition"] = fan_out_shards(
        cfg, classes=inputs["classes"], features_uri=features_uri, registry_uri=registry_uri, linear_uri=linear_uri,
        entry_id=entry_id, label=f"{inputs['model']}-{inputs['dataset']}")
    computed = sorted(c for r in records for c in r["computed"])
    log.info("decomposition: %d classes computed, %d reused, %d shards in %.1f s", len(computed),
             len(inputs["classes"]) - len(computed), len(records), stages["decomposition"])
    # Publish and parity run as Ray tasks: they gather every class's arrays, which the driver never holds.
    t = time.perf_counter()
    published = publish_entry.submit(registry_uri=registry_uri, linear_uri=linear_uri, entry_id=entry_id, n_classes=C,
                  metadata={"config": json.loads(cfg.model_dump_json()), "run": cfg.name,
                            "features": {"train": features_uri, "train_fingerprint": inputs["fingerprint"],
                                         "test": test_features_uri,
                                         "test_fingerprint": (inputs["test"] or {}).get("fingerprint")},
                            "head": {"uri": head_uri, "sha256": inputs["head_sha256"]},
                            "decomposed_classes": inputs["classes"]},
                  decomposed=inputs["classes"]).result()
    stages["publish"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics: dict = evaluate_store_parity.submit(registry_uri=registry_uri, linear_uri=linear_uri,
                                                 entry_id=entry_id, test_features_uri=test_features_uri).result()
    extremes = metrics.pop("classes_by_nmf_error")
    stages["parity"] = time.perf_counter() - t
    shard_compute = sum(r["seconds"] for r in records)
    metrics.update({
        "n_classes": C, "k": dec.k, "entry_id": entry_id, "registry": registry_uri, "features": features_uri,
        "decomposed_classes": inputs["classes"], "classes_computed": len(computed),
        "classes_reused": len(inputs["classes"]) - len(computed), "shards": len(records),
        "decomposition_seconds": round(stages["decomposition"], 3),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "shard_compute_seconds": round(shard_compute, 3),
        "shard_peak_rss_mb": max((r.get("peak_rss_mb") or 0.0 for r in records), default=None),
        "shard_start_rss_mb": min((r.get("start_rss_mb") or 0.0 for r in records), default=None),
        "shard_workers": sorted({f"{r['host']}:{r['pid']}" for r in records}),
    })
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))  # first: nothing is lost
    record_entry_metrics(registry_uri=registry_uri, entry_id=entry_id, version=published["version"], metrics=metrics)
    _store_artifacts(cfg, metrics, entry_id, registry_uri, extremes)
    return metrics


def _store_artifacts(cfg: RunConfig, metrics: dict, entry_id: str, registry_uri: str, rows: list[dict]) -> None:
    """Bounded artifacts, whatever C: the metrics and the worst and best classes by NMF error (not one row per
    class)."""
    key = "".join(ch if ch.isalnum() else "-" for ch in f"phpn-store-{cfg.name}").lower()
    create_table_artifact(rows, key=f"{key}-classes", description=f"worst and best classes of {entry_id} "
                                                                  f"(NMF relative error) of {metrics['n_classes']}")
    lines = [f"# phpn decompose `{cfg.name}`", "", f"Registry entry `{entry_id}` in `{registry_uri}`", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {metrics.get(k)} |" for k in METRIC_KEYS if k in metrics]
    lines += [f"| stage {k} (s) | {v} |" for k, v in metrics["stage_seconds"].items()]
    create_markdown_artifact("\n".join(lines), key=f"{key}-metrics", description="phpn decompose metrics")


# -- distributed extraction (compute.extract_tasks) ----------------------------------------------------------------


def extract_store(cfg: RunConfig, model_rec: dict, split: str, uri: str, datasets=None) -> dict:
    """Extract the ``split`` features into the store at ``uri``: in the driver (``compute.extract_tasks`` None), or
    as up to ``extract_tasks`` Ray tasks over disjoint chunk ranges of the missing chunks (``num_gpus`` where the
    cluster has GPUs; a killed task is re-run by Ray and redoes only its unfinished chunks). Either way the same
    bytes; returns the store's record. Call inside a flow."""
    from prefect_ray.context import remote_options

    from tasks.extract import chunk_ranges, create_feature_store, extract_chunk_range, finish_feature_store

    n_tasks = cfg.compute.extract_tasks
    if n_tasks is None:
        return extract_split(cfg, model_rec, split, uri, datasets)
    created = create_feature_store(cfg, model_rec, split, uri, datasets)
    resources = {"num_cpus": cfg.compute.cpus_per_task, "max_retries": 3}
    if cfg.compute.gpus_per_task > 0 and _cluster_has_gpus():
        resources["num_gpus"] = cfg.compute.gpus_per_task
    futures = []
    with remote_options(**resources):
        for chunks in chunk_ranges(created["missing"], n_tasks):
            futures.append(extract_chunk_range.submit(cfg, model_rec, split, uri, chunks))
    records = [f.result() for f in futures]
    return finish_feature_store(cfg, model_rec, split, uri, records)
