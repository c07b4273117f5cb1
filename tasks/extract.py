"""Distributed feature extraction: one store, disjoint chunk ranges per Ray task (``compute.extract_tasks``).

The driver creates (or reopens) the store once with :func:`create_feature_store` (the schema needs one forward
pass), then the flow submits :func:`extract_chunk_range` for disjoint ranges of the missing chunks. Each task
computes only its chunks (``extract_features(chunks=...)``): batches never straddle a chunk, so every chunk's
bytes are those a single-process extraction writes (same device and threads). A task killed mid-way (SIGKILL, OOM,
node loss) is re-run by Ray; the chunks it finished are kept, the others redone. A finished store is checked
complete by :func:`finish_feature_store`.

Images are checked where they are read: an unreadable image fails its task with an error that lists every
unreadable image of the task's chunks (probed only on that failure), so its features are never trusted.
"""

from __future__ import annotations

import time

from prefect.cache_policies import NO_CACHE
from prefect import task

from phpn_core.config import RunConfig

from .common import fault_point, pick_device, retry_on_io, worker_identity
from .inputs import all_unreadable, load_classifier


def _extract(cfg: RunConfig, model_rec: dict, split: str, uri: str, chunks, *, on_chunk=None, progress=False,
             datasets=None):
    from phpn_core.data.factory import RunDatasets
    from phpn_core.extract import extract_features

    _, features, _, _ = load_classifier(model_rec)
    ds = RunDatasets.of(cfg.dataset, datasets).split(split)  # a Ray worker builds its own
    res = extract_features(
        features, ds, uri, model=model_rec["arch"], checkpoint_digest=model_rec["digest"], split=split,
        input_size=cfg.dataset.image_size, dataset_name=cfg.dataset.kind, dtype=cfg.compute.feature_dtype,
        batch_size=cfg.compute.batch_size, device=pick_device(cfg.compute.device), progress=progress,
        compression=cfg.compute.feature_compression, chunks=chunks, on_chunk=on_chunk,
    )
    return res, ds


@task(cache_policy=NO_CACHE, name="extract-create", task_run_name="extract-{split}-create", retries=2,
      retry_delay_seconds=2, retry_condition_fn=retry_on_io)
def create_feature_store(cfg: RunConfig, model_rec: dict, split: str, uri: str, datasets=None) -> dict:
    """Create (or reopen and validate) the ``split`` store at ``uri``; compute nothing. Returns ``uri``,
    ``n_chunks`` and the ``missing`` chunk indices (ascending)."""
    res, _ = _extract(cfg, model_rec, split, uri, [], datasets=datasets)
    return {"uri": uri, "n_chunks": res.store.n_chunks, "missing": res.store.missing_chunks()}


def _range_name(parameters: dict) -> str:
    ch = parameters["chunks"]
    return f"extract-{parameters['split']}-c{ch[0]}-{ch[-1]}" if ch else f"extract-{parameters['split']}-none"


@task(cache_policy=NO_CACHE, name="extract-chunks", task_run_name=_range_name, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def extract_chunk_range(cfg: RunConfig, model_rec: dict, split: str, uri: str, chunks: list[int]) -> dict:
    """Compute and write the still-missing chunks among ``chunks`` of the store at ``uri`` (created beforehand).

    Returns a small record (chunks written, images, seconds, worker). An unreadable image raises
    :class:`~phpn_core.data.images.ImageLoadError` listing every unreadable image of these chunks.
    """
    from phpn_core.data.images import ImageLoadError

    t0 = time.perf_counter()
    written: list[int] = []

    def on_chunk(ev) -> None:
        written.append(ev.chunk_index)
        if len(written) == 1:
            fault_point("extract")  # inert unless a test plants PHPN_FAULT_DIR/extract.hold (after one chunk)

    try:
        res, _ = _extract(cfg, model_rec, split, uri, chunks, on_chunk=on_chunk)
    except ImageLoadError as e:
        err = all_unreadable(cfg, split, uri, chunks, e)
        raise _portable(err) if isinstance(err, ImageLoadError) else err from None
    return {"chunks": list(chunks), "chunks_written": list(res.chunks_written), "images": res.images_computed,
            "feature_min": res.feature_min, "feature_max": res.feature_max,
            "seconds": round(time.perf_counter() - t0, 3), **worker_identity()}


def _rebuild_image_error(message: str, path: str):
    from phpn_core.data.images import ImageLoadError

    return ImageLoadError(message, path=path)


def _portable(err):
    """``err`` (an ImageLoadError) made picklable, so that it crosses back from a Ray worker as itself (its
    keyword-only ``path`` defeats the default exception pickling)."""
    err.__reduce__ = lambda: (_rebuild_image_error, (str(err), err.path))  # type: ignore[method-assign]
    return err


@task(cache_policy=NO_CACHE, name="extract-finish", task_run_name="extract-{split}-finish")
def finish_feature_store(cfg: RunConfig, model_rec: dict, split: str, uri: str, records: list[dict]) -> dict:
    """The store's record once every chunk is written (as ``extract_split`` returns it); raises StoreError naming
    the chunks still missing otherwise."""
    from phpn_core.errors import StoreError
    from phpn_core.storage.feature_store import FeatureStore

    store = FeatureStore.open(uri)
    missing = store.missing_chunks()
    if missing:
        raise StoreError(f"feature store {store.uri}: {len(missing)} chunks still missing after the extraction "
                         f"tasks ({missing[:10]}): expected all {store.n_chunks}. Re-run: finished chunks are kept.")
    s = store.schema
    mins = [r["feature_min"] for r in records if r.get("feature_min") is not None]
    maxs = [r["feature_max"] for r in records if r.get("feature_max") is not None]
    return {"uri": store.uri, "fingerprint": store.fingerprint, "n_images": s.n_images, "n_chunks": store.n_chunks,
            "feature_shape": list(s.feature_shape), "dtype": s.dtype,
            "chunks_written": sum(len(r["chunks_written"]) for r in records),
            "chunks_skipped": store.n_chunks - sum(len(r["chunks_written"]) for r in records),
            "images_computed": sum(r["images"] for r in records),
            "feature_min": min(mins) if mins else None, "feature_max": max(maxs) if maxs else None,
            "extract_tasks": len(records), "workers": sorted({f"{r['host']}:{r['pid']}" for r in records})}


def chunk_ranges(missing: list[int], n_tasks: int) -> list[list[int]]:
    """``missing`` (ascending) cut into at most ``n_tasks`` contiguous, near-equal, disjoint ranges."""
    n = max(1, min(n_tasks, len(missing)))
    q, r = divmod(len(missing), n)
    out, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        if size:
            out.append(missing[start:start + size])
        start += size
    return out
