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
    from phpn_core.method.decompose import STREAM_BYTES
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.tensorio import read_tensors

    t0 = time.perf_counter()
    rss_start = _rss_mb()
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
    # A class too large to hold in float32 is streamed from the store in blocks (decompose_head reads it again for
    # every pass): the shard's memory is then one block, whatever the class size.
    H, W, D = store.schema.feature_shape
    counts = store.class_counts
    feats = {c: store.class_row_source(c) if int(counts[c]) * H * W * D * 4 > STREAM_BYTES
             else store.class_features(c) for c in todo}
    hd = decompose_head(feats, linear["weight"].float(), k, seed=seed, device=dev, **options)
    registry.write_classes(entry_id, hd.classes, {
        "prototypes": hd.prototypes.cpu(), "initial": hd.initial.cpu(), "alpha": hd.alpha.cpu(),
        "residual": hd.residual.cpu(), "rel_error": hd.rel_error.cpu(), "head_error": hd.head_error.cpu(),
        **{n: v.double() for n, v in hd.diagnostics.items()},
    })
    import resource  # the worker's peak RSS so far (Ray reuses workers: an upper bound for this shard)

    return {**record, "seconds": round(time.perf_counter() - t0, 3),
            "max_head_error": float(hd.head_error.max()), "mean_rel_error": float(hd.rel_error.mean()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "start_rss_mb": rss_start, "torch_threads": __import__("torch").get_num_threads()}


def _rss_mb() -> float | None:
    """This process's resident memory now (Linux), MB; None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next((round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmRSS:")), None)
    except OSError:
        return None


@task(cache_policy=NO_CACHE, name="publish-entry", task_run_name="publish-{entry_id}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def publish_entry(*, registry_uri: str, linear_uri: str, entry_id: str, n_classes: int, metadata: dict,
                  decomposed: list[int] | None = None) -> dict:
    """Gather the staged classes into one atomically published registry entry. ``decomposed``: the staged head
    rows when not all C were decomposed (the others keep their linear row, see ``PrototypeRegistry.publish``)."""
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.tensorio import read_tensors

    linear, _ = read_tensors(linear_uri)
    partial = decomposed is not None and list(decomposed) != list(range(n_classes))
    info = PrototypeRegistry(registry_uri).publish(
        entry_id, n_classes=n_classes, bias=linear["bias"].float(), metadata=metadata,
        **({"decomposed": list(decomposed), "weight": linear["weight"].float()} if partial else {}))
    return info.model_dump(mode="json") if hasattr(info, "model_dump") else dict(info)


@task(cache_policy=NO_CACHE, name="record-metrics", task_run_name="record-metrics-{entry_id}", retries=2,
      retry_delay_seconds=2, retry_condition_fn=retry_on_io)
def record_entry_metrics(*, registry_uri: str, entry_id: str, version: str, metrics: dict) -> str:
    """Store the run's metrics beside the published version (``PrototypeRegistry.record_metrics``), so the
    registry carries them wherever the run directory goes. Returns the object's URI."""
    from phpn_core.storage.registry import PrototypeRegistry

    return PrototypeRegistry(registry_uri).record_metrics(entry_id, metrics, version=version)


# -- decomposing a feature store someone else extracted (`phpn decompose`) -----------------------------------------


@task(cache_policy=NO_CACHE, name="store-inputs", task_run_name="store-inputs")
def prepare_store_inputs(*, features_uri: str, head_uri: str, registry_uri: str, k: int, identity: dict,
                         classes: list[int] | None = None, test_features_uri: str | None = None) -> dict:
    """Check a feature store and a linear head against each other before any compute; copy the head into the
    registry's inputs; return the entry id and a small record.

    ``head_uri``: safetensors with ``weight [C, D]`` and ``bias [C]`` (C = the store's classes, D = its channels).
    ``identity``: what else determines the prototypes (the decomposition options), hashed into the entry id with the
    store's fingerprint and the head's bytes. Raises InputValueError / ShapeError naming what does not fit.
    Reads only the store's metadata (O(n) labels), never its features.
    """
    import hashlib
    import json

    from phpn_core.errors import InputValueError, ShapeError
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.tensorio import read_tensors, write_tensors
    from phpn_core.storage.uri import redact

    store = FeatureStore.open(features_uri)
    sch = store.schema
    H, W, D = sch.feature_shape
    tensors, _ = read_tensors(head_uri)
    missing = [n for n in ("weight", "bias") if n not in tensors]
    if missing:
        raise InputValueError(
            f"head file {redact(head_uri)} lacks {missing}: expected safetensors with 'weight' [C, D] and 'bias' [C], "
            f"got tensors {sorted(tensors)}. Fix: save_file({{'weight': fc.weight, 'bias': fc.bias}}, path).")
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    if weight.dim() != 2 or tuple(weight.shape) != (sch.n_classes, D) or tuple(bias.shape) != (sch.n_classes,):
        raise ShapeError(
            f"head {redact(head_uri)} does not fit the feature store {redact(features_uri)}: expected weight "
            f"[C={sch.n_classes}, D={D}] and bias [{sch.n_classes}] (the store's classes and channels), got weight "
            f"{list(weight.shape)} and bias {list(bias.shape)}. Fix: pass the linear head of the model that "
            "extracted this store.")
    if not (_finite(weight) and _finite(bias)):
        raise InputValueError(f"head {redact(head_uri)} holds NaN/inf: expected finite weights. Fix: use another "
                              "checkpoint.")
    counts = store.class_counts
    # As decompose.classes in `phpn run`: the given rows, or every row with images; the others keep their linear row.
    rows = [c for c in range(sch.n_classes) if counts[c] > 0] if classes is None else sorted(classes)
    bad = [c for c in rows if not 0 <= c < sch.n_classes]
    if bad:
        raise InputValueError(f"classes {bad[:5]} are not head rows: expected rows in [0, {sch.n_classes}). Fix: "
                              "pick classes from the store's class list.")
    empty = [c for c in rows if counts[c] == 0]
    if empty or not rows:
        raise InputValueError(
            f"classes {empty[:10]} have no image in {redact(features_uri)}: expected images for every class to "
            "decompose. Fix: leave them out of --classes (or leave --classes out: every class with images).")
    if k > D:
        raise InputValueError(f"k={k} is larger than the store's {D} feature channels: expected k <= {D}.")
    short = [(c, int(counts[c])) for c in rows if int(counts[c]) * H * W < k]
    if short:
        names = sch.class_names
        shown = ", ".join(f"class {c} ({names[c]!r}): {n} images" for c, n in short[:5])
        raise InputValueError(
            f"{len(short)} classes have too few images in {redact(features_uri)} for k={k} (each image gives "
            f"{H}x{W} = {H * W} rows; k prototypes need >= k rows): {shown}{' ...' if len(short) > 5 else ''}. "
            "Fix: lower k, or leave those classes out with --classes.")
    if not store.is_complete:
        raise InputValueError(f"feature store {redact(features_uri)} is incomplete ({len(store.missing_chunks())} "
                              f"of {store.n_chunks} chunks unwritten): expected a finished extraction. Fix: finish "
                              "writing every chunk (write_chunk) first.")
    test = None
    if test_features_uri is not None:
        test_store = FeatureStore.open(test_features_uri)
        ts = test_store.schema
        if ts.feature_shape[2] != D or ts.n_classes != sch.n_classes:
            raise ShapeError(
                f"test store {redact(test_features_uri)} does not fit the training store: expected {sch.n_classes} "
                f"classes and D={D}, got {ts.n_classes} classes and D={ts.feature_shape[2]}.")
        test = {"uri": test_features_uri, "fingerprint": test_store.fingerprint, "n_images": len(test_store)}
    head_sha = hashlib.sha256(weight.numpy().tobytes() + bias.numpy().tobytes()).hexdigest()
    ident = {"store": store.fingerprint, "head_sha256": head_sha, "classes": rows, **identity}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    entry_id = PrototypeRegistry.entry_id(sch.model, sch.dataset, k, digest)
    linear_uri = f"{registry_uri}/inputs/{entry_id}/linear.safetensors"
    write_tensors(linear_uri, {"weight": weight, "bias": bias})
    return {"entry_id": entry_id, "linear_uri": linear_uri, "n_classes": sch.n_classes, "dim": D,
            "feature_shape": [H, W, D], "classes": rows, "n_images": len(store), "fingerprint": store.fingerprint,
            "head_sha256": head_sha, "model": sch.model, "dataset": sch.dataset, "test": test}


def _finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


@task(cache_policy=NO_CACHE, name="store-parity", task_run_name="store-parity-{entry_id}")
def evaluate_store_parity(*, registry_uri: str, linear_uri: str, entry_id: str,
                          test_features_uri: str | None = None, extremes: int = 10) -> dict:
    """Head reconstruction error of the published entry and its ``extremes`` worst and best classes by NMF
    relative error (``classes_by_nmf_error``); with a test store, the original and decomposed heads' accuracy and
    max logit difference on its features, read one class at a time (memory bounded by the largest class, not the
    store)."""
    import torch

    from phpn_core.evaluation.parity import head_reconstruction_error
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.tensorio import read_tensors

    registry = PrototypeRegistry(registry_uri)
    head, _ = registry.load(entry_id)
    linear, _ = read_tensors(linear_uri)
    W, b = linear["weight"].float(), linear["bias"].float()
    arrays = registry.load_arrays(entry_id)
    rel, herr = arrays["rel_error"].double(), arrays["head_error"].double()
    del arrays
    order = rel.argsort(descending=True).tolist()
    top = min(extremes, len(order))
    picks = [(c, "worst") for c in order[:top]] + [(c, "best") for c in order[max(top, len(order) - top):]]
    out = {"max_head_reconstruction_error": head_reconstruction_error(head, W),
           "classes_by_nmf_error": [{"class": c, "rank": r, "nmf_rel_error": round(float(rel[c]), 5),
                                     "head_error": float(herr[c])} for c, r in picks]}
    if test_features_uri is None:
        return {**out, "accuracy_original": None, "accuracy_decomposed": None, "max_abs_logit_diff": None,
                "n_test_images": 0}
    store = FeatureStore.open(test_features_uri)
    n = right_o = right_d = 0
    diff = 0.0
    with torch.inference_mode():
        for c in store.classes:
            F = store.class_features(c)  # [n_c, H, W, D]
            orig = F.mean((1, 2)) @ W.T + b
            dec = head(F.permute(0, 3, 1, 2))
            n += F.shape[0]
            right_o += int((orig.argmax(1) == c).sum())
            right_d += int((dec.argmax(1) == c).sum())
            diff = max(diff, float((orig - dec).abs().max()))
    return {**out, "accuracy_original": right_o / max(n, 1), "accuracy_decomposed": right_d / max(n, 1),
            "max_abs_logit_diff": diff, "n_test_images": n}
