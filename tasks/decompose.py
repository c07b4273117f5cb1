"""Decomposition tasks: one shard of classes per task, then one publish."""

from __future__ import annotations

import time

from prefect.cache_policies import NO_CACHE
from prefect import task

from .common import fault_point, pick_device, retry_on_io, worker_identity


def shard_run_name(parameters: dict) -> str:
    cl = parameters["classes"]
    return f"decompose-{parameters['label']}-c{cl[0]}-{cl[-1]}"


@task(cache_policy=NO_CACHE, name="decompose-shard", task_run_name=shard_run_name, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def decompose_shard(*, features_uri: str, registry_uri: str, linear_uri: str, entry_id: str, classes: list[int],
                    k: int, seed: int, options: dict, device: str, label: str) -> dict:
    """Decompose ``classes`` (read from the feature store by URI), stage them in the registry by URI.

    Classes the registry already holds for this entry are skipped: the staged class objects are the cache,
    keyed by (entry id = config digest, class), so a re-run recomputes only what is missing.
    """

    from phpn_core import decompose_head
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.tensorio import read_tensors

    t0 = time.perf_counter()
    registry = PrototypeRegistry(registry_uri)
    todo = sorted(set(classes) - registry.staged_classes(entry_id))
    record = {"classes": list(classes), "computed": todo, "reused": sorted(set(classes) - set(todo)),
              **worker_identity()}
    if not todo:
        return {**record, "seconds": round(time.perf_counter() - t0, 3), "max_head_error": None}
    fault_point("shard")  # inert unless a test plants PHPN_FAULT_DIR/shard.hold
    store = FeatureStore.open(features_uri)
    linear, _ = read_tensors(linear_uri)
    dev = pick_device(device)
    feats = {c: store.class_features(c) for c in todo}
    hd = decompose_head(feats, linear["weight"].float(), k, seed=seed, device=dev, **options)
    registry.write_classes(entry_id, hd.classes, {
        "prototypes": hd.prototypes.cpu(), "initial": hd.initial.cpu(), "alpha": hd.alpha.cpu(),
        "residual": hd.residual.cpu(), "rel_error": hd.rel_error.cpu(), "head_error": hd.head_error.cpu(),
        **{n: v.double() for n, v in hd.diagnostics.items()},
    })
    return {**record, "seconds": round(time.perf_counter() - t0, 3),
            "max_head_error": float(hd.head_error.max()), "mean_rel_error": float(hd.rel_error.mean())}


@task(cache_policy=NO_CACHE, name="publish-entry", task_run_name="publish-{entry_id}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def publish_entry(*, registry_uri: str, linear_uri: str, entry_id: str, n_classes: int, metadata: dict) -> dict:
    """Gather the staged classes into one atomically published registry entry."""
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.tensorio import read_tensors

    linear, _ = read_tensors(linear_uri)
    info = PrototypeRegistry(registry_uri).publish(entry_id, n_classes=n_classes, bias=linear["bias"].float(),
                                                   metadata=metadata)
    return info.model_dump(mode="json") if hasattr(info, "model_dump") else dict(info)
