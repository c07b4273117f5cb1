"""Feature extraction: run a feature extractor over a dataset into a :class:`~phpn_core.storage.feature_store.FeatureStore`.

:func:`extract_features` fills the store chunk by chunk (see :mod:`phpn_core.storage.feature_store` for the layout):

- **Resumable.** Only the chunks in ``store.missing_chunks()`` are computed; finished chunks are kept, and a chunk
  whose write was interrupted (data written, done marker not) is simply rewritten. A crash, a kill or an exception
  at any point loses at most the chunks in flight.
- **Bit-identical on resume.** Batches never straddle a chunk and a chunk is always cut into the same batches, so a
  chunk's numbers do not depend on which other chunks a run computes (batch composition can change the last bits
  of a convolution): a resumed store equals an uninterrupted one byte for byte (same device and threads).
- **Overlapped.** Images are decoded by a torch ``DataLoader`` (``num_workers`` processes, pinned memory on CUDA),
  the forward pass runs in the calling thread, and background writer threads (bounded queue) check, encode and
  write finished chunks, so compute waits on storage only when storage is the bottleneck. The calling thread does
  as little as it can besides the forward pass, because on few cores anything else it does, or any Python work
  that holds the GIL in another thread, slows the forward pass itself: it normalises in place, makes no copy of
  the output on the CPU (a channels-last output is already the store's layout: a whole chunk is encoded straight
  from it; otherwise the store's copy into its chunk block transposes and casts), and leaves the min/max pass to
  the writers, whose codecs release the GIL (see :mod:`phpn_core.storage.chunkio`). A writer failure is raised in the
  calling thread, after the chunks already queued are written.
- **Honest.** Features are written as computed: negative values (a module whose ``nonnegative`` is False, e.g.
  ConvNeXt) are not clamped; the observed minimum and maximum are returned in :class:`ExtractionResult`.

Images are normalised with ``normalize(x, dataset.mean, dataset.std)`` and the map ``[B, D, h, w]`` is stored
channels last, ``[B, h, w, D]``, in ``float32`` or ``float16``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, SchemaMismatchError, ShapeError
from phpn_core.storage.feature_store import Compression, FeatureSchema, FeatureStore

__all__ = [
    "ChunkWritten",
    "ExtractionResult",
    "build_schema",
    "dataset_fingerprint",
    "extract_features",
]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
# Writer threads, and chunks queued for or being written (bounds host memory: <= 6 x 4 MiB chunks). Several writers
# overlap each chunk's fixed storage latency (two sequential store calls; on S3 two rounds of PUTs of ~10-50 ms): one
# writer would cap S3 at ~20 chunks/s, below what a GPU produces. Locally they are idle most of the time.
_WRITERS = 4
_QUEUE_DEPTH = 6
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)  # BatchNorm, InstanceNorm, Dropout
_POLL_S = 0.1  # how often a blocked queue operation looks for a writer failure
# Dataset attributes that never change the pixels (paths, error policies), left out of the fingerprint; the ids of
# skipped images are in it anyway (they are missing from image_ids).
_FINGERPRINT_SKIP = frozenset(
    {"root", "on_error", "max_pixels", "skipped", "skip_reasons", "labels", "image_ids", "classes", "part_names"}
)


# ------------------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ChunkWritten:
    """Passed to ``on_chunk`` after chunk ``chunk_index`` (``n_images`` images) has been written and marked done;
    ``chunks_done`` of this call's ``chunks_todo`` chunks are written so far."""

    chunk_index: int
    n_images: int
    chunks_done: int
    chunks_todo: int


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`extract_features` did.

    Attributes:
        store: the feature store (open; read it with ``store.class_features(c)``).
        chunks_written: the chunk indices this call computed and wrote, ascending.
        chunks_skipped: chunks that were already done (resume) and were left as they are.
        images_computed: images passed through the extractor by this call (the schema's dry run excluded).
        feature_min, feature_max: the smallest and largest feature value this call wrote, as stored (after the cast
            to the store's dtype; None when it computed nothing). ``feature_min < 0`` means the features are not
            non-negative (NMF needs them >= 0).
        nonnegative: what the extractor declares (``features.nonnegative``; None when it has no such attribute).
        seconds: wall time of the call.
        setup_seconds: the part of ``seconds`` spent before the first batch: the schema's dry run, creating or
            opening the store, reading its progress (a fixed cost per call, independent of the number of images).
    """

    store: FeatureStore
    chunks_written: tuple[int, ...]
    chunks_skipped: int
    images_computed: int
    feature_min: float | None
    feature_max: float | None
    nonnegative: bool | None
    seconds: float
    setup_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every chunk of the store is written."""
        return self.store.is_complete

    def record(self) -> dict[str, Any]:
        """A small JSON-able summary (for task results and logs): URI (redacted), fingerprint, counts, stats."""
        s = self.store.schema
        return {
            "uri": self.store.uri,
            "fingerprint": self.store.fingerprint,
            "n_images": s.n_images,
            "n_chunks": self.store.n_chunks,
            "feature_shape": list(s.feature_shape),
            "dtype": s.dtype,
            "chunks_written": len(self.chunks_written),
            "chunks_skipped": self.chunks_skipped,
            "images_computed": self.images_computed,
            "feature_min": self.feature_min,
            "feature_max": self.feature_max,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
        }


# ------------------------------------------------------------------------------------------------------------------
# dataset identity


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short stable digest (16 hex chars) of what a dataset holds, computed without decoding any image.

    Covers the dataset class (module and name), ``classes``, ``part_names``, every image id and label (in item
    order), ``image_size``, ``mean``/``std``, and the dataset's public scalar settings (e.g. SynthParts' ``seed`` and
    ``omit_prob``, CUB's ``crop_to_bbox``); not its root path or error policy (moving the files changes nothing;
    images skipped as unreadable are absent from the ids).
    """
    ids = _image_ids(dataset)
    labels = _labels(dataset, len(ids))
    ident = {
        "type": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "classes": [str(c) for c in _classes(dataset)],
        "part_names": _part_names(dataset),
        "image_ids": ids,
        "labels": labels,
        "image_size": _jsonable_scalar(getattr(dataset, "image_size", None)),
        "mean": [float(v) for v in _norm_stat(dataset, "mean")],
        "std": [float(v) for v in _norm_stat(dataset, "std")],
        "config": _scalar_config(dataset),
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _scalar_config(dataset: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(vars(dataset).items()):
        if k.startswith("_") or k in _FINGERPRINT_SKIP:
            continue
        if isinstance(v, (tuple, list)) and len(v) <= 64 and all(_is_scalar(x) for x in v):
            out[k] = [_jsonable_scalar(x) for x in v]
        elif _is_scalar(v):
            out[k] = _jsonable_scalar(v)
    return out


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_))


def _jsonable_scalar(v: Any) -> Any:
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else repr(float(v))
    return v


def _contract_error(dataset: Any, what: str) -> InputValueError:
    return InputValueError(
        f"{type(dataset).__name__} does not follow phpn's dataset contract: {what}. Expected a dataset like those "
        "in phpn_core.data (items with image/label/image_id, and attributes classes, labels, image_ids or "
        "image_id(i), mean, std). Fix: add the missing attribute to the dataset."
    )


def _image_ids(dataset: Any) -> list[str]:
    ids = getattr(dataset, "image_ids", None)
    if ids is not None and not callable(ids):
        ids = [str(s) for s in ids]
    elif callable(getattr(dataset, "image_id", None)):
        ids = [str(dataset.image_id(i)) for i in range(len(dataset))]
    else:
        raise _contract_error(dataset, "it has neither an image_ids list nor an image_id(i) method")
    if len(ids) != len(dataset):
        raise _contract_error(dataset, f"len(image_ids) = {len(ids)} but len(dataset) = {len(dataset)}")
    return ids


def _labels(dataset: Any, n: int) -> list[int]:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise _contract_error(dataset, "it has no labels attribute (all labels in item order)")
    out = [int(v) for v in labels]
    if len(out) != n:
        raise _contract_error(dataset, f"len(labels) = {len(out)} but len(dataset) = {n}")
    return out


def _classes(dataset: Any) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if classes is None or len(classes) == 0:
        raise _contract_error(dataset, "it has no (or an empty) classes attribute")
    return [str(c) for c in classes]


def _part_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "part_names", None)
    return None if names is None else [str(p) for p in names]


def _norm_stat(dataset: Any, name: str) -> tuple[float, ...]:
    v = getattr(dataset, name, None)
    if v is None:
        raise _contract_error(dataset, f"it has no {name} attribute (per-channel normalisation {name})")
    return tuple(float(x) for x in v)


# ------------------------------------------------------------------------------------------------------------------
# schema


def build_schema(
    features: nn.Module,
    dataset: Dataset,
    *,
    model: str | None = None,
    checkpoint_digest: str,
    split: str | None = None,
    layer: str = "features",
    input_size: int | None = None,
    dataset_name: str | None = None,
    dataset_fingerprint: str | None = None,
    dtype: Literal["float16", "float32"] = "float32",
    device: str | torch.device = "cpu",
) -> FeatureSchema:
    """The :class:`FeatureSchema` of ``features`` over ``dataset``, from one dry forward pass on the first image.

    Args:
        features: x ``[B, 3, S, S]`` (normalised) -> ``[B, D, h, w]``, in eval mode (e.g. from ``split_classifier``).
        dataset: a phpn dataset (see :mod:`phpn_core.data.base`).
        model: model name recorded in the schema; default ``features.arch``.
        checkpoint_digest: the weights' identity, e.g. :func:`phpn_core.models.spec.checkpoint_digest` (required:
            two different weights must never share a store).
        split: default ``dataset.split``.
        layer: which layer the features come from (recorded; default ``"features"``).
        input_size: expected image side S; checked against the dataset's images when given.
        dataset_name: default the dataset's class name.
        dataset_fingerprint: default :func:`dataset_fingerprint` of ``dataset``.
        dtype: storage dtype, ``"float32"`` or ``"float16"``.
        device: where the dry run runs (the module is moved there).

    ``feature_shape`` is ``(h, w, D)`` of the dry run, ``feature_shift`` is ``features.shift`` (0.0 if absent).
    """
    dev = _check_device(device)
    _check_eval(features)
    _check_dtype(dtype)
    if model is None:
        model = getattr(features, "arch", None)
        if not isinstance(model, str) or not model:
            raise InputValueError(
                f"model name missing: {type(features).__name__} has no .arch, so the name to record in the store "
                "cannot be inferred. Fix: pass model='resnet34' (or the spec's arch)."
            )
    if not isinstance(checkpoint_digest, str) or not checkpoint_digest:
        raise InputValueError(
            f"checkpoint_digest must be a non-empty string, got {checkpoint_digest!r}. Fix: pass "
            "phpn_core.models.spec.checkpoint_digest(path) ('none' for random weights)."
        )
    if split is None:
        split = getattr(dataset, "split", None)
        if not isinstance(split, str) or not split:
            raise InputValueError(
                f"split missing: {type(dataset).__name__} has no .split attribute. Fix: pass split='train' (or the "
                "split's name)."
            )
    classes = _classes(dataset)
    n = len(dataset)
    if n == 0:
        raise InputValueError(f"{type(dataset).__name__} is empty: expected at least one image. Fix: check its root.")
    fp = _dataset_fingerprint_fn(dataset) if dataset_fingerprint is None else dataset_fingerprint
    sample = dataset[0]
    image = _sample_image(sample, 0)
    S = int(image.shape[-1])
    if input_size is not None and int(input_size) != S:
        raise ShapeError(
            f"{type(dataset).__name__} gives {S}x{S} px images, but input_size={input_size} was requested. "
            f"Fix: build the dataset with image_size={input_size} (or pass input_size={S})."
        )
    mean, std = _norm_stat(dataset, "mean"), _norm_stat(dataset, "std")
    features.to(dev)
    with torch.inference_mode():
        out = features(normalize(image.unsqueeze(0).to(dev), mean, std))
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(
            f"{type(features).__name__} returned {got} for one image: expected a feature map [1, D, h, w]. "
            "Fix: pass the feature extractor from split_classifier(model), not the classifier."
        )
    _, D, h, w = out.shape
    return FeatureSchema(
        model=model,
        checkpoint_digest=checkpoint_digest,
        layer=layer,
        input_size=S,
        dataset=dataset_name or type(dataset).__name__,
        dataset_fingerprint=fp,
        split=split,
        dtype=dtype,
        feature_shift=float(getattr(features, "shift", 0.0)),
        n_images=n,
        n_classes=len(classes),
        feature_shape=(int(h), int(w), int(D)),
        class_names=classes,
        part_names=_part_names(dataset),
    )


_dataset_fingerprint_fn = dataset_fingerprint  # build_schema's keyword of the same name shadows it


# ------------------------------------------------------------------------------------------------------------------
# extraction


def extract_features(
    features: nn.Module,
    dataset: Dataset,
    uri: str | os.PathLike[str],
    *,
    schema: FeatureSchema | None = None,
    model: str | None = None,
    checkpoint_digest: str | None = None,
    split: str | None = None,
    layer: str = "features",
    input_size: int | None = None,
    dataset_name: str | None = None,
    dataset_fingerprint: str | None = None,
    dtype: Literal["float16", "float32"] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    images_per_chunk: int | None = None,
    chunks: Sequence[int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[ChunkWritten], None] | None = None,
    compression: Compression = "zstd",
    channels_last: bool = True,
) -> ExtractionResult:
    """Extract ``features(normalize(image))`` for every image of ``dataset`` into the feature store at ``uri``.

    Creates the store, or reopens it and computes only its missing chunks (resume). A store at ``uri`` holding
    other features (another model, checkpoint, layer, dataset, split or dtype) raises
    :class:`~phpn_core.errors.SchemaMismatchError` naming both fingerprints, unless ``overwrite=True``.

    Args:
        features: x ``[B, 3, S, S]`` -> ``[B, D, h, w]`` in eval mode (e.g. ``split_classifier(model)[0]``); moved to
            ``device``. Its ``shift`` (default 0.0) is recorded; its output is stored as is (never clamped).
        dataset: a phpn dataset (items ``image [3, S, S]`` in [0, 1], ``label``, ``image_id``, optional
            ``keypoints [P, 3]``, which are stored too). An unreadable image raises the dataset's own error (it
            names the file); build the dataset with ``on_error="skip"`` to leave such images out.
        uri: local path or ``s3://bucket/prefix``.
        schema: a ready schema (e.g. from :func:`build_schema`); then ``model``, ``checkpoint_digest``, ``split``,
            ``layer``, ``input_size``, ``dataset_name``, ``dataset_fingerprint`` and ``dtype`` must not be given.
        model, checkpoint_digest, split, layer, input_size, dataset_name, dataset_fingerprint, dtype: the schema's
            pieces, see :func:`build_schema` (``checkpoint_digest`` is required; ``dtype`` defaults to float32).
        batch_size: upper bound on images per forward pass (a batch never straddles a chunk).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        num_workers: DataLoader worker processes decoding images (0: in the calling thread).
        images_per_chunk: chunk size of a new store (default: the store's choice, 1-4 MiB chunks); None reuses an
            existing store's.
        chunks: compute only these chunk indices (those of them still missing), e.g. one worker's share; default
            all missing chunks. ``chunks=[]`` only creates (or validates) the store.
        storage_options: s3fs options for ``s3://`` URIs (None: from the environment).
        overwrite: delete whatever is at ``uri`` first.
        progress: show a progress bar (rich, on stderr).
        compression: feature-chunk compression of a new store, see :data:`phpn_core.storage.feature_store.COMPRESSIONS`.
        channels_last: run ``features`` with its weights in PyTorch's channels-last memory format (they are
            restored to its own layout afterwards). The output is then already laid out as the store keeps it (no
            transposing copy), and convolutions are often faster in it on CPUs and GPUs; values equal the standard
            layout's up to float rounding (a few ulp). False: run ``features`` as it is.
        on_chunk: called in the calling thread with a :class:`ChunkWritten` after each chunk is written and marked
            done. An exception it raises stops the extraction (chunks already written stay done).

    Returns:
        :class:`ExtractionResult` (the store, the chunks written, observed min/max, timing).
    """
    t0 = time.perf_counter()
    dev = _check_device(device)
    batch_size = _check_pos_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputValueError(f"num_workers must be an int >= 0, got {num_workers!r}. Fix: pass 0 or e.g. 2.")
    if on_chunk is not None and not callable(on_chunk):
        raise InputValueError(f"on_chunk must be callable or None, got {type(on_chunk).__name__}.")
    _check_eval(features)
    pieces = dict(
        model=model, checkpoint_digest=checkpoint_digest, split=split, input_size=input_size,
        dataset_name=dataset_name, dataset_fingerprint=dataset_fingerprint, dtype=dtype,
    )
    if schema is not None:
        given = [k for k, v in pieces.items() if v is not None] + (["layer"] if layer != "features" else [])
        if not isinstance(schema, FeatureSchema):
            raise InputValueError(f"schema must be a FeatureSchema, got {type(schema).__name__}.")
        if given:
            raise InputValueError(
                f"extract_features got both schema= and its pieces {given}: expected one or the other. "
                "Fix: drop the pieces (the schema already holds them) or drop schema=."
            )
        shift = float(getattr(features, "shift", 0.0))
        if shift != schema.feature_shift:
            raise SchemaMismatchError(
                f"schema.feature_shift = {schema.feature_shift} but {type(features).__name__}.shift = {shift}: the "
                "schema was built for another extractor. Fix: build it with build_schema(features, dataset, ...)."
            )
        features.to(dev)
    else:
        if checkpoint_digest is None:
            raise InputValueError(
                "checkpoint_digest is required: expected the identity of the weights, got None. Fix: pass "
                "checkpoint_digest=phpn_core.models.spec.checkpoint_digest(path) ('none' for random weights), or a "
                "ready schema=."
            )
        schema = build_schema(
            features, dataset, model=model, checkpoint_digest=checkpoint_digest, split=split, layer=layer,
            input_size=input_size, dataset_name=dataset_name, dataset_fingerprint=dataset_fingerprint,
            dtype=dtype or "float32", device=dev,
        )
    if schema.n_images != len(dataset):
        raise ShapeError(
            f"schema.n_images = {schema.n_images} but the dataset has {len(dataset)} images. Fix: build the schema "
            "for this dataset (build_schema)."
        )
    ids = _image_ids(dataset)
    labels = _labels(dataset, len(ids))
    # Datasets with parts give keypoints [P, 3] with every item (the sample contract).
    kp_shape = (len(schema.part_names), 3) if schema.part_names else None
    store = FeatureStore.create(
        uri, schema, labels=labels, image_ids=ids, keypoints_shape=kp_shape, images_per_chunk=images_per_chunk,
        storage_options=storage_options, overwrite=overwrite, compression=compression,
    )
    # A store this call has just created holds nothing yet: spare reading its K done markers.
    missing = list(range(store.n_chunks)) if store.created_empty else store.missing_chunks()
    todo = missing if chunks is None else _select_chunks(chunks, missing, store.n_chunks)
    skipped = store.n_chunks - len(missing)
    nonneg = getattr(features, "nonnegative", None)
    nonneg = bool(nonneg) if isinstance(nonneg, bool) else None
    setup = time.perf_counter() - t0
    if not todo:
        log.info("feature store %s: nothing to compute (%d chunks already done)", store.uri, skipped)
        return ExtractionResult(store, (), skipped, 0, None, None, nonneg, time.perf_counter() - t0, setup)

    run = _Run(
        features=features, dataset=dataset, store=store, ids=ids, dev=dev, batch_size=batch_size,
        num_workers=num_workers, with_keypoints=kp_shape is not None, progress=progress, on_chunk=on_chunk,
    )
    with _channels_last(features, enabled=channels_last):
        images, fmin, fmax = run.execute(todo)
    if fmin is not None and fmin < 0:
        if nonneg is False:
            log.warning(
                "feature store %s: features are signed (min %.4g; %s declares nonnegative=False): stored as "
                "computed, not clamped; decompose.discovery 'auto' factorises them (hybrid_nmf)",
                store.uri, fmin, type(features).__name__,
            )
        else:
            log.warning(
                "feature store %s: %s produced negative features (min %.4g) although they should be >= 0 "
                "(nonnegative=%s); NMF needs non-negative features: check the split point (post-ReLU) or the shift",
                store.uri, type(features).__name__, fmin, nonneg,
            )
    return ExtractionResult(
        store=store,
        chunks_written=tuple(sorted(todo)),
        chunks_skipped=skipped,
        images_computed=images,
        feature_min=fmin,
        feature_max=fmax,
        nonnegative=nonneg,
        seconds=time.perf_counter() - t0,
        setup_seconds=setup,
    )


@dataclass
class _Job:
    """One chunk for the writer: its rows as CPU tensors, in row order (concatenated by the writer)."""

    chunk: int
    n: int
    feats: list[torch.Tensor] = field(default_factory=list)  # [b, h, w, D] each, channels last (maybe a view)
    kps: list[torch.Tensor] = field(default_factory=list)  # [b, P, 3] float32 each; empty without keypoints
    buffer: torch.Tensor | None = None  # CUDA: the pinned host buffer the rows were copied into (recycled)
    event: Any = None  # CUDA: recorded after the device -> host copies


@contextlib.contextmanager
def _channels_last(features: nn.Module, *, enabled: bool) -> Iterator[None]:
    """``features``' 4-d weights in channels-last layout for the block, restored to their own layout after it (the
    same Parameter objects, the same values: a layout conversion copies exactly)."""
    if not enabled:
        yield
        return
    layouts = {name: _layout(p) for name, p in features.named_parameters()}
    features.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for name, p in features.named_parameters():
            if p.dim() == 4 and layouts.get(name) is not None:
                p.data = p.data.contiguous(memory_format=layouts[name])


def _layout(p: torch.Tensor) -> torch.memory_format | None:
    if p.dim() != 4:
        return None
    return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() \
        else torch.contiguous_format


def _rows(parts: list[torch.Tensor]) -> np.ndarray:
    # One part (the common case: a chunk is one batch): a zero-copy, possibly strided, view; write_chunk encodes a
    # whole chunk already in the store's layout and dtype straight from it, else its copy into the chunk block
    # transposes and casts. Several parts: concatenated here, off the compute thread.
    if len(parts) == 1:
        return parts[0].numpy()
    return np.concatenate([p.numpy() for p in parts])


class _Writer:
    """Background writers: ``n_threads`` threads take :class:`_Job` s from ``jobs`` and write them; at most ``depth``
    jobs are queued or being written (bounded memory). Chunks are independent objects, so several are written at
    once: the fixed latency of each chunk's storage round trips (two store calls, thread hand-offs, S3 requests)
    then overlaps instead of adding up. Pinned buffers are recycled into ``free``; ``(chunk, n, min, max)`` is
    reported in ``done`` (the min and max of the values written). The first exception is kept in ``error`` (the
    thread that raised it stops; the others finish the jobs already queued, which are correct, so that as much as
    possible is kept for a resume)."""

    def __init__(self, store: FeatureStore, *, n_threads: int = _WRITERS, depth: int = _QUEUE_DEPTH) -> None:
        self.store = store
        self.jobs: queue.Queue = queue.Queue()  # unbounded: `slots` bounds it, so stop sentinels never block
        self.slots = threading.Semaphore(depth)
        self.free: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, name=f"phpn-feature-writer-{i}", daemon=True) for i in range(n_threads)
        ]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if job.event is not None:
                    job.event.synchronize()
                lo, hi = self.store.write_chunk(job.chunk, _rows(job.feats),
                                                keypoints=_rows(job.kps) if job.kps else None)
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                with self._lock:
                    if self.error is None:
                        self.error = e
                return
            finally:
                self.slots.release()
            if job.buffer is not None:
                self.free.put(job.buffer)  # write_chunk has encoded and stored the data: the buffer can be reused
            self.done.put((job.chunk, job.n, lo, hi))

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if not any(t.is_alive() for t in self.threads):
            raise RuntimeError("the feature writer threads stopped unexpectedly")  # pragma: no cover

    def put(self, job: _Job) -> None:
        while not self.slots.acquire(timeout=_POLL_S):
            self.raise_if_failed()
        self.raise_if_failed()
        self.jobs.put(job)

    def take_buffer(self) -> torch.Tensor:
        while True:
            self.raise_if_failed()
            try:
                return self.free.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def finish(self) -> None:
        """Write what is queued, then stop; raises the writers' error if one failed."""
        for _ in self.threads:
            self.jobs.put(None)  # FIFO: after the queued jobs
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


class _Run:
    """One extraction pass over a list of chunks (see :func:`extract_features`)."""

    def __init__(
        self, *, features: nn.Module, dataset: Dataset, store: FeatureStore, ids: list[str], dev: torch.device,
        batch_size: int, num_workers: int, with_keypoints: bool, progress: bool,
        on_chunk: Callable[[ChunkWritten], None] | None,
    ) -> None:
        self.features, self.dataset, self.store, self.ids, self.dev = features, dataset, store, ids, dev
        self.batch_size, self.num_workers = batch_size, num_workers
        self.with_keypoints, self.progress, self.on_chunk = with_keypoints, progress, on_chunk
        self.cuda = dev.type == "cuda"
        s = store.schema
        self.fshape = s.feature_shape  # (h, w, D)
        self.st_dtype = _DTYPES[s.dtype]
        self.mean, self.std = _norm_stat(dataset, "mean"), _norm_stat(dataset, "std")
        self.n_buffers = 0
        self.written = 0
        # min / max of the values written, from the writers (one pass over each chunk there, off the compute thread)
        self.fmin: float | None = None
        self.fmax: float | None = None

    def _plan(self, todo: list[int]) -> list[tuple[int, int, int, int, list[int]]]:
        """``(chunk, chunk size m, row0, row1, dataset indices)`` per batch: each chunk is cut into the same
        batches whichever other chunks are computed."""
        plan = []
        for k in todo:
            idx = self.store.chunk_indices(k).tolist()
            for r0 in range(0, len(idx), self.batch_size):
                plan.append((k, len(idx), r0, min(len(idx), r0 + self.batch_size), idx[r0 : r0 + self.batch_size]))
        return plan

    def _pinned_buffer(self, writer: _Writer) -> torch.Tensor:
        # CUDA: a small pool of page-locked host buffers [ipc, h, w, D], recycled by the writer (pinned memory is
        # costly to allocate, and the pool bounds host memory).
        if self.n_buffers < _QUEUE_DEPTH + 2:
            self.n_buffers += 1
            return torch.empty((self.store.images_per_chunk, *self.fshape), dtype=self.st_dtype, pin_memory=True)
        return writer.take_buffer()

    def _report(self, writer: _Writer, total_chunks: int, bar: Any, task: Any) -> None:
        while True:
            try:
                k, n, lo, hi = writer.done.get_nowait()
            except queue.Empty:
                return
            self.written += 1
            self.fmin = lo if self.fmin is None else min(self.fmin, lo)
            self.fmax = hi if self.fmax is None else max(self.fmax, hi)
            if bar is not None:
                bar.update(task, chunks=f"{self.written}/{total_chunks} chunks")
            if self.on_chunk is not None:
                self.on_chunk(
                    ChunkWritten(chunk_index=k, n_images=n, chunks_done=self.written, chunks_todo=total_chunks)
                )

    def execute(self, todo: list[int]) -> tuple[int, float | None, float | None]:
        """Compute and write the chunks ``todo``; returns (images computed, min, max)."""
        plan = self._plan(todo)
        n_images = sum(len(p[4]) for p in plan)
        loader = DataLoader(
            self.dataset,
            batch_sampler=[p[4] for p in plan],
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.cuda,
        )
        it = iter(loader)  # starts the workers before any thread of ours exists (they are forked)
        writer = _Writer(self.store)
        bar, task = _progress_bar(self.progress, n_images, self.store.uri)
        h, w, D = self.fshape
        job = _Job(-1, 0)
        computed = 0
        try:
            with torch.inference_mode():
                for k, m, r0, r1, idx in plan:
                    batch = next(it)
                    if batch["image_id"] != [self.ids[i] for i in idx]:
                        raise _id_mismatch(self.dataset, idx, batch["image_id"], self.ids)
                    x = batch["image"].to(self.dev, non_blocking=True)
                    # in place: the batch is this run's own copy (the collate's stack, or its device copy)
                    out = self.features(normalize(x, self.mean, self.std, inplace=True))
                    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(idx), D, h, w):
                        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                        raise ShapeError(
                            f"{type(self.features).__name__} returned {got} for chunk {k}: expected "
                            f"[{len(idx)}, {D}, {h}, {w}] as in the store's schema. Fix: extract with the same "
                            "extractor and input size as the store was created with."
                        )
                    if out.dtype == torch.bfloat16:  # numpy has no bfloat16 (autocast / bf16 models)
                        out = out.float()
                    if r0 == 0:  # the plan lists a chunk's batches consecutively, from row 0
                        job = _Job(k, m, buffer=self._pinned_buffer(writer) if self.cuda else None)
                    if self.cuda:
                        # Channels last and the storage dtype on the device (half the transfer for float16), then
                        # one asynchronous copy into pinned memory; the writer waits on the chunk's event.
                        cl = torch.empty((len(idx), h, w, D), dtype=self.st_dtype, device=self.dev)
                        cl.copy_(out.permute(0, 2, 3, 1))  # transpose + cast in one kernel
                        job.buffer[r0:r1].copy_(cl, non_blocking=True)
                    else:
                        # No copy here: the writer's copy into the chunk block transposes and casts.
                        job.feats.append(out.permute(0, 2, 3, 1))
                    if self.with_keypoints:
                        kp = batch.get("keypoints")
                        if kp is None:
                            raise _contract_error(
                                self.dataset, f"items {idx[:3]} have no keypoints although it has part_names"
                            )
                        job.kps.append(kp)
                    computed += len(idx)
                    if r1 == m:
                        if self.cuda:
                            job.feats = [job.buffer[:m]]
                            job.event = torch.cuda.Event()
                            job.event.record()
                        writer.put(job)
                    if bar is not None:
                        bar.update(task, advance=len(idx))
                    self._report(writer, len(todo), bar, task)
            writer.finish()
            self._report(writer, len(todo), bar, task)
        except BaseException as e:
            # Let the writers finish the chunks already queued (they are correct) before raising: nothing is written
            # behind the caller's back after this function has returned.
            try:
                writer.finish()
            except BaseException as e2:  # noqa: BLE001
                if e2 is not e and hasattr(e, "add_note"):
                    e.add_note(f"(the feature writer also failed: {type(e2).__name__}: {e2})")
            raise
        finally:
            if bar is not None:
                bar.stop()
            del it  # shuts DataLoader workers down
        return computed, self.fmin, self.fmax


def _collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": torch.stack([_sample_image(it, i) for i, it in enumerate(items)]),
        "image_id": [str(it["image_id"]) for it in items],
    }
    if all(it.get("keypoints") is not None for it in items):
        out["keypoints"] = torch.stack([torch.as_tensor(it["keypoints"], dtype=torch.float32) for it in items])
    return out


def _sample_image(sample: Any, i: int) -> torch.Tensor:
    image = sample.get("image") if isinstance(sample, Mapping) else None
    ok = isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3
    if not ok or image.shape[1] != image.shape[2]:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ShapeError(
            f"dataset item {i} has an invalid image: expected a float tensor [3, S, S] in [0, 1] under 'image', got "
            f"{got}. Fix: follow phpn_core.data.base's sample contract."
        )
    return image


def _id_mismatch(dataset: Any, idx: list[int], got: list[str], ids: list[str]) -> InputValueError:
    j = next(j for j, (i, g) in enumerate(zip(idx, got)) if ids[i] != g)
    return InputValueError(
        f"{type(dataset).__name__} item {idx[j]} has image_id {got[j]!r}, but its image_ids list says "
        f"{ids[idx[j]]!r}: the items and the id list disagree, so features would be stored under the wrong image. "
        "Fix: keep image_ids/image_id(i) in item order."
    )


def _progress_bar(enabled: bool, total: int, uri: str) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[chunks]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), refresh_per_second=4,
    )
    task = bar.add_task("extract", total=total, chunks="")
    bar.start()
    log.info("extracting %d images into %s", total, uri)
    return bar, task


# ------------------------------------------------------------------------------------------------------------------
# checks


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputValueError(
            f"device {device!r} is not a torch device. Fix: pass 'cpu', 'cuda' or 'cuda:0'."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputValueError(
            f"device {str(dev)!r} requested but CUDA is not available on this machine. Fix: pass device='cpu'."
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputValueError(f"device {str(dev)!r} is not supported: expected 'cpu' or 'cuda[:i]'.")
    return dev


def _check_eval(features: Any) -> None:
    if not isinstance(features, nn.Module):
        raise InputValueError(
            f"features must be an nn.Module (x [B, 3, S, S] -> [B, D, h, w]), got {type(features).__name__}. "
            "Fix: pass split_classifier(model)[0]."
        )
    # Only modules whose forward depends on the mode matter (a wrapper's own flag does not).
    training = [
        name or type(features).__name__
        for name, m in features.named_modules()
        if m.training and isinstance(m, _MODE_DEPENDENT)
    ]
    if training:
        raise InputValueError(
            f"{type(features).__name__} is in training mode ({len(training)} BatchNorm/Dropout modules, e.g. "
            f"{training[:3]}): expected eval mode, else BatchNorm uses batch statistics and Dropout is active, so "
            "features depend on the batch. Fix: call model.eval() before splitting/extracting."
        )


def _check_dtype(dtype: Any) -> None:
    if dtype not in _DTYPES:
        raise InputValueError(
            f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}. Fix: pass dtype='float16' to halve the store."
        )


def _check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1, got {value!r}. Fix: pass e.g. 64.")
    return int(value)


def _select_chunks(chunks: Sequence[int], missing: list[int], n_chunks: int) -> list[int]:
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, (Sequence, np.ndarray)):
        raise InputValueError(f"chunks must be a sequence of chunk indices, got {type(chunks).__name__}.")
    want = set()
    for k in chunks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n_chunks:
            raise InputValueError(
                f"chunks holds {k!r}: expected chunk indices in [0, {n_chunks}). Fix: pass indices from "
                "store.missing_chunks()."
            )
        want.add(int(k))
    return [k for k in missing if k in want]
