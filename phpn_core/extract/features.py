"""``extract_features``: fill a feature store with an extractor's maps over a dataset (resumable; see the package)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from phpn_core.errors import InputValueError, SchemaMismatchError, ShapeError
from phpn_core.extract.checks import (
    check_device,
    check_eval_mode,
    check_pos_int,
    select_chunks,
)
from phpn_core.extract.contract import image_ids_of, labels_of
from phpn_core.extract.pipeline import (
    ChunkWritten,
    ExtractionPass,
    channels_last_weights,
)
from phpn_core.extract.schema import build_schema
from phpn_core.storage.feature_store import Compression, FeatureSchema, FeatureStore

__all__ = ["ExtractionResult", "extract_features"]

log = logging.getLogger("phpn_core.extract")


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
    dev = check_device(device)
    batch_size = check_pos_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputValueError(f"num_workers must be an int >= 0, got {num_workers!r}. Fix: pass 0 or e.g. 2.")
    if on_chunk is not None and not callable(on_chunk):
        raise InputValueError(f"on_chunk must be callable or None, got {type(on_chunk).__name__}.")
    check_eval_mode(features)
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
    ids = image_ids_of(dataset)
    labels = labels_of(dataset, len(ids))
    # Datasets with parts give keypoints [P, 3] with every item (the sample contract).
    kp_shape = (len(schema.part_names), 3) if schema.part_names else None
    store = FeatureStore.create(
        uri, schema, labels=labels, image_ids=ids, keypoints_shape=kp_shape, images_per_chunk=images_per_chunk,
        storage_options=storage_options, overwrite=overwrite, compression=compression,
    )
    # A store this call has just created holds nothing yet: spare reading its K done markers.
    missing = list(range(store.n_chunks)) if store.created_empty else store.missing_chunks()
    todo = missing if chunks is None else select_chunks(chunks, missing, store.n_chunks)
    skipped = store.n_chunks - len(missing)
    nonneg = getattr(features, "nonnegative", None)
    nonneg = bool(nonneg) if isinstance(nonneg, bool) else None
    setup = time.perf_counter() - t0
    if not todo:
        log.info("feature store %s: nothing to compute (%d chunks already done)", store.uri, skipped)
        return ExtractionResult(store, (), skipped, 0, None, None, nonneg, time.perf_counter() - t0, setup)

    run = ExtractionPass(
        features=features, dataset=dataset, store=store, ids=ids, dev=dev, batch_size=batch_size,
        num_workers=num_workers, with_keypoints=kp_shape is not None, progress=progress, on_chunk=on_chunk,
    )
    with channels_last_weights(features, enabled=channels_last):
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
