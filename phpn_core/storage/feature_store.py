"""Zarr v3 feature store: the backbone's feature maps of one (model, dataset, split), by class, on disk or S3.

One Zarr v3 group per store, at a local path or an ``s3://bucket/prefix`` URI (the same code through zarr's
fsspec support; see :mod:`phpn_core.storage.uri` for URIs and storage options).

Layout (``R`` = storage rows, ``K`` = chunks, ``ipc`` = images per chunk, ``C`` = classes, ``n`` = images)::

    features       [R, H, W, D]  schema.dtype   chunks (ipc, H, W, D)
    keypoints      [R, P, 3]     float32        chunks (ipc, P, 3)    (only when the store has keypoints)
    labels         [R]           int32          -1 on padding rows
    image_ids      [R]           str            "" on padding rows
    dataset_index  [R]           int64          the dataset index stored in each row, -1 on padding rows
    valid          [R]           bool           False on padding rows
    class_offsets  [C + 1]       int64          class c's block starts at row class_offsets[c] (a chunk boundary)
    class_counts   [C]           int64          class c's images are rows class_offsets[c] : class_offsets[c] + n_c
    done           [K]           bool           chunks (1,): chunk k has been completely written

Images are stored class-contiguous (stable-sorted by label, so dataset order within a class) and each class's block
starts on a chunk boundary, padded up to a whole number of chunks. Reading class c therefore touches only class c's
chunks, and each chunk belongs to exactly one class. Padding rows are zeros (compressed to little; the default
``images_per_chunk`` is chosen to keep padding small).

Resume: ``done`` has one object per chunk (concurrent writers never share one) and is set only after the chunk's
data is written, so an interrupted write leaves its chunk "missing" and it is simply rewritten.

The schema (:class:`FeatureSchema`) is stored as JSON in the group attributes under ``"phpn"``; URIs and storage
options never are.

The class is split by job: this module holds the layout (create, open, resume, indices);
:mod:`~phpn_core.storage.feature_writes` the chunk writes, :mod:`~phpn_core.storage.feature_reads` the class reads,
:mod:`~phpn_core.storage.feature_checks` the argument checks and :mod:`~phpn_core.storage.zarr_group` the Zarr
group itself and the translation of storage failures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr

from phpn_core.errors import InputValueError, SchemaMismatchError, StoreError
from phpn_core.storage.feature_checks import (
    check_image_ids,
    check_index,
    check_keypoints_shape,
    check_labels,
    check_positive_int,
    fmt_diff,
)
from phpn_core.storage.feature_reads import ClassReads
from phpn_core.storage.feature_writes import ChunkWrites
from phpn_core.storage.schema import (
    ATTR_KEY,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    INDEX_CHUNK_ROWS,
    STORE_KIND,
    Compression,
    FeatureSchema,
    StoreLayout,
    compressors_for,
    default_images_per_chunk,
)
from phpn_core.storage.uri import (
    StorageLocation,
    parse_uri,
    redact,
    resolve_storage_options,
    secrets_of,
)
from phpn_core.storage.zarr_group import (
    create_group,
    probe_group,
    schema_from_meta,
    storage_errors,
    zarr_store,
)

__all__ = ["FORMAT_VERSION", "FeatureSchema", "FeatureStore", "IDENTITY_FIELDS", "default_images_per_chunk"]


class FeatureStore(ClassReads, ChunkWrites):
    """A class-contiguous Zarr v3 store of feature maps ``[n, H, W, D]``; see the module docstring for the layout.

    Build with :meth:`create` (or reopen with :meth:`open`); write with :meth:`write_chunk` for each index in
    :meth:`missing_chunks`; read a class with :meth:`class_features`. Safe for concurrent writers of different
    chunks (each chunk and its done marker are separate objects); :meth:`create` must run once, before them.
    """

    # -- construction ----------------------------------------------------------------------------------------

    def __init__(
        self,
        *,
        _loc: StorageLocation,
        _options: dict[str, Any] | None,
        _group: zarr.Group,
        _meta: dict[str, Any],
        _schema: FeatureSchema,
        _layout: StoreLayout | None = None,
    ) -> None:
        # Private: use create() or open().
        # True when create() has just built this store new: nothing is written yet, so progress need not be read.
        self.created_empty = False
        self._loc = _loc
        self._options = _options
        self._group = _group
        self._meta = _meta
        self._schema = _schema
        self._secrets = secrets_of(_options)
        self._ipc = int(_meta["images_per_chunk"])
        kp = _meta.get("keypoints_shape")
        self._kp_shape: tuple[int, int] | None = (int(kp[0]), int(kp[1])) if kp is not None else None
        if _layout is not None:  # create() has just computed it: spare the reads
            self.__dict__["_layout"] = _layout  # seeds the cached property
            self._class_offsets, self._class_counts = _layout.class_offsets, _layout.class_counts
        else:
            with self._io("read the layout of"):
                self._class_offsets = np.asarray(_group["class_offsets"][:], dtype=np.int64)
                self._class_counts = np.asarray(_group["class_counts"][:], dtype=np.int64)
        expected_rows = int(_meta["n_rows"])
        if len(self._class_offsets) != _schema.n_classes + 1 or int(self._class_offsets[-1]) != expected_rows:
            raise StoreError(
                f"Feature store at {self.uri} is inconsistent: expected class_offsets of length "
                f"{_schema.n_classes + 1} ending at {expected_rows} rows, got length {len(self._class_offsets)} "
                f"ending at {int(self._class_offsets[-1]) if len(self._class_offsets) else 'nothing'}. "
                "Fix: recreate it with FeatureStore.create(..., overwrite=True)."
            )

    @classmethod
    def create(
        cls,
        uri: str | os.PathLike[str],
        schema: FeatureSchema,
        *,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        image_ids: Sequence[str],
        keypoints_shape: int | tuple[int, int] | None = None,
        images_per_chunk: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        compression: Compression = "zstd",
    ) -> FeatureStore:
        """Create the store at ``uri`` for ``schema``, or reopen it for resume.

        ``labels [n]`` (n = schema.n_images, values in ``[0, n_classes)``) and ``image_ids [n]`` (unique strings)
        are in dataset order; the store computes the class-sorted layout (see :attr:`order`).
        ``keypoints_shape`` is ``P`` or ``(P, 3)`` when keypoints are stored. ``images_per_chunk`` defaults to
        :func:`default_images_per_chunk`. ``storage_options`` are s3fs options (None: from the environment).

        An existing store with the same fingerprint, sizes, labels and ids is reopened as is (written chunks are
        kept; see :meth:`missing_chunks`). A different one raises :class:`SchemaMismatchError` unless
        ``overwrite=True``, which always deletes what is at ``uri`` and starts empty.

        ``compression`` of the feature chunks (see :data:`COMPRESSIONS`); a reopened store keeps its own.
        """
        if not isinstance(schema, FeatureSchema):
            raise InputValueError(
                f"schema must be a FeatureSchema, got {type(schema).__name__}. "
                "Fix: build one with FeatureSchema(model=..., ...)."
            )
        loc = parse_uri(uri)
        opts = resolve_storage_options(uri, storage_options)
        label_arr = check_labels(labels, schema)
        ids = check_image_ids(image_ids, schema.n_images)
        kp_shape = check_keypoints_shape(keypoints_shape, schema)
        counts = np.bincount(label_arr, minlength=schema.n_classes)
        itemsize = np.dtype(schema.dtype).itemsize
        if images_per_chunk is None:
            ipc = default_images_per_chunk(counts, math.prod(schema.feature_shape) * itemsize)
        else:
            ipc = check_positive_int("images_per_chunk", images_per_chunk)
        codecs = compressors_for(compression)
        secrets = secrets_of(opts)
        with storage_errors("connect to", loc, opts, secrets, write=True):  # bad storage options fail here
            zstore = zarr_store(loc, opts, read_only=False)

        if not overwrite:
            with storage_errors("look for an existing feature store at", loc, opts, secrets, write=False):
                existing = probe_group(zstore, redact(loc.url, secrets=secrets))
            if existing is not None:
                store = cls._resume(loc, opts, existing, schema, label_arr, ids, kp_shape, images_per_chunk)
                if store is not None:
                    return store
                # else: creation of the existing store was interrupted before its layout was complete; rebuild.

        layout = StoreLayout.build(label_arr, schema.n_classes, ipc)
        meta = {
            "kind": STORE_KIND,
            "format_version": FORMAT_VERSION,
            "fingerprint": schema.fingerprint(),
            "schema": schema.model_dump(mode="json"),
            "images_per_chunk": ipc,
            "n_rows": layout.n_rows,
            "n_chunks": layout.n_chunks,
            "keypoints_shape": list(kp_shape) if kp_shape is not None else None,
            "layout_complete": False,
            "compression": compression,
        }
        H, W, D = schema.feature_shape
        R = layout.n_rows
        index_chunks = (max(1, min(R, INDEX_CHUNK_ROWS)),)
        rows_valid = layout.dataset_index >= 0
        storage_labels = np.full(R, -1, dtype=np.int32)
        storage_labels[rows_valid] = label_arr[layout.dataset_index[rows_valid]]
        storage_ids = np.full(R, "", dtype=object)
        storage_ids[rows_valid] = np.asarray(ids, dtype=object)[layout.dataset_index[rows_valid]]
        C = schema.n_classes
        arrays: list[tuple[str, dict[str, Any], np.ndarray | None]] = [  # name, create_array options, data
            ("features", dict(shape=(R, H, W, D), chunks=(ipc, H, W, D), dtype=schema.dtype, fill_value=0,
                              compressors=codecs), None),
            ("labels", dict(shape=(R,), chunks=index_chunks, dtype="int32", fill_value=-1), storage_labels),
            ("image_ids", dict(shape=(R,), chunks=index_chunks, dtype=str, fill_value=""), storage_ids),
            ("dataset_index", dict(shape=(R,), chunks=index_chunks, dtype="int64", fill_value=-1),
             layout.dataset_index),
            ("valid", dict(shape=(R,), chunks=index_chunks, dtype="bool", fill_value=False), rows_valid),
            ("class_offsets", dict(shape=(C + 1,), chunks=(C + 1,), dtype="int64", fill_value=0), layout.class_offsets),
            ("class_counts", dict(shape=(C,), chunks=(C,), dtype="int64", fill_value=0), layout.class_counts),
            # One object per chunk: concurrent writers of different chunks never read-modify-write a shared one.
            ("done", dict(shape=(layout.n_chunks,), chunks=(1,), dtype="bool", fill_value=False), None),
        ]
        if kp_shape is not None:
            arrays.append(("keypoints", dict(shape=(R, kp_shape[0], 3), chunks=(ipc, kp_shape[0], 3),
                                             dtype="float32", fill_value=0), None))
        with storage_errors("create the feature store at", loc, opts, secrets, write=True):
            group = create_group(zstore, meta, arrays)
        meta = {**meta, "layout_complete": True}
        store = cls(_loc=loc, _options=opts, _group=group, _meta=meta, _schema=schema, _layout=layout)
        store.created_empty = True
        return store

    @classmethod
    def _resume(
        cls,
        loc: StorageLocation,
        opts: dict[str, Any] | None,
        existing: tuple[zarr.Group, dict[str, Any] | None],
        schema: FeatureSchema,
        labels: np.ndarray,
        ids: list[str],
        kp_shape: tuple[int, int] | None,
        images_per_chunk: int | None,
    ) -> FeatureStore | None:
        """Reopen an existing store that matches the request; None when its creation never completed."""
        group, meta = existing
        shown = redact(loc.url, secrets=secrets_of(opts))
        if meta is None:
            raise StoreError(
                f"Something that is not a phpn feature store already exists at {shown}: expected an empty location "
                "or a feature store, got a Zarr node without phpn metadata. Fix: choose another URI, or pass "
                "overwrite=True to delete it."
            )
        stored = schema_from_meta(meta, shown)
        want, got = schema.fingerprint(), meta.get("fingerprint")
        if want != got:
            raise SchemaMismatchError(
                f"Feature store at {shown} holds different features: expected fingerprint {want}, found {got} "
                f"(differing fields, requested vs stored: {fmt_diff(schema.identity_diff(stored))}). "
                "Fix: pass overwrite=True to replace it, or write to another URI (one store per model, checkpoint, "
                "layer, dataset and split)."
            )
        if not meta.get("layout_complete", False):
            return None
        problems = schema.structure_diff(stored)
        stored_kp = meta.get("keypoints_shape")
        stored_kp = tuple(stored_kp) if stored_kp is not None else None
        if stored_kp != kp_shape:
            problems["keypoints_shape"] = (kp_shape, stored_kp)
        if images_per_chunk is not None and int(images_per_chunk) != int(meta["images_per_chunk"]):
            problems["images_per_chunk"] = (int(images_per_chunk), int(meta["images_per_chunk"]))
        if problems:
            raise SchemaMismatchError(
                f"Feature store at {shown} has the same fingerprint {want} but a different layout: "
                f"{fmt_diff(problems)} (requested vs stored). Fix: pass overwrite=True to rebuild it, or request "
                "the stored layout (images_per_chunk=None reuses it)."
            )
        store = cls(_loc=loc, _options=opts, _group=group, _meta=meta, _schema=stored)
        if not np.array_equal(store.labels.numpy(), labels):
            bad = int(np.flatnonzero(store.labels.numpy() != labels)[0])
            raise SchemaMismatchError(
                f"Feature store at {shown} (fingerprint {want}) was created for other labels: expected label "
                f"{int(labels[bad])} for image {bad}, found {int(store.labels[bad])}. Fix: the dataset changed without "
                "changing dataset_fingerprint; update the fingerprint, or pass overwrite=True."
            )
        if store.image_ids != ids:
            bad = next(i for i, (a, b) in enumerate(zip(store.image_ids, ids)) if a != b)
            raise SchemaMismatchError(
                f"Feature store at {shown} (fingerprint {want}) was created for other image ids: expected "
                f"{ids[bad]!r} for image {bad}, found {store.image_ids[bad]!r}. Fix: the dataset changed without "
                "changing dataset_fingerprint; update the fingerprint, or pass overwrite=True."
            )
        return store

    @classmethod
    def open(
        cls,
        uri: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        expected_fingerprint: str | None = None,
    ) -> FeatureStore:
        """Open an existing store (for reading, and for writing chunks). ``storage_options``: s3fs options (None:
        from the environment). ``expected_fingerprint``: refuse a store holding other features."""
        loc = parse_uri(uri)
        opts = resolve_storage_options(uri, storage_options)
        secrets = secrets_of(opts)
        shown = redact(loc.url, secrets=secrets)
        with storage_errors("open the feature store at", loc, opts, secrets, write=False):
            zstore = zarr_store(loc, opts, read_only=False)
            existing = probe_group(zstore, shown)
        if existing is None:
            raise StoreError(
                f"No feature store at {shown}: expected a Zarr group written by FeatureStore.create, found nothing. "
                "Fix: check the URI (and the endpoint/bucket for s3://), or create the store first with "
                "FeatureStore.create(uri, schema, labels=..., image_ids=...) and extract the features into it."
            )
        group, meta = existing
        if meta is None:
            raise StoreError(
                f"The Zarr node at {shown} is not a phpn feature store: expected group attributes under "
                f"{ATTR_KEY!r}, got none. Fix: point to the store's root, or recreate it with FeatureStore.create."
            )
        schema = schema_from_meta(meta, shown)
        if not meta.get("layout_complete", False):
            raise StoreError(
                f"Feature store at {shown} is incomplete: its creation was interrupted before the layout was written. "
                "Fix: call FeatureStore.create again with the same schema, labels and ids."
            )
        got = meta.get("fingerprint")
        if expected_fingerprint is not None and expected_fingerprint != got:
            raise SchemaMismatchError(
                f"Feature store at {shown} holds different features: expected fingerprint {expected_fingerprint}, "
                f"found {got} (model={schema.model}, layer={schema.layer}, dataset={schema.dataset}, "
                f"split={schema.split}, dtype={schema.dtype}). Fix: open the store written for this schema, or "
                "re-extract the features."
            )
        return cls(_loc=loc, _options=opts, _group=group, _meta=meta, _schema=schema)

    # -- description ---------------------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The store's canonical URI, with any credentials redacted."""
        return redact(self._loc.url, secrets=self._secrets)

    @property
    def schema(self) -> FeatureSchema:
        return self._schema

    @property
    def fingerprint(self) -> str:
        return str(self._meta["fingerprint"])

    @property
    def images_per_chunk(self) -> int:
        return self._ipc

    @property
    def n_chunks(self) -> int:
        return int(self._meta["n_chunks"])

    @property
    def n_rows(self) -> int:
        """Storage rows, padding included (``>= len(self)``)."""
        return int(self._meta["n_rows"])

    @property
    def keypoints_shape(self) -> tuple[int, int] | None:
        """``(P, 3)`` when the store holds keypoints, else None."""
        return self._kp_shape

    @property
    def class_counts(self) -> np.ndarray:
        """Images per class, ``[C]`` int64 (a copy)."""
        return self._class_counts.copy()

    @property
    def classes(self) -> list[int]:
        """The class indices with at least one image, ascending."""
        return [int(c) for c in np.flatnonzero(self._class_counts > 0)]

    def __len__(self) -> int:
        return self._schema.n_images

    def __repr__(self) -> str:
        s = self._schema
        return (
            f"FeatureStore(uri={self.uri!r}, fingerprint={self.fingerprint!r}, model={s.model!r}, "
            f"dataset={s.dataset!r}, split={s.split!r}, n_images={s.n_images}, feature_shape={s.feature_shape}, "
            f"dtype={s.dtype!r}, images_per_chunk={self._ipc}, n_chunks={self.n_chunks})"
        )

    @cached_property
    def _layout(self) -> StoreLayout:
        with self._io("read the index of"):
            dataset_index = np.asarray(self._group["dataset_index"][:], dtype=np.int64)
        return StoreLayout(
            ipc=self._ipc,
            class_offsets=self._class_offsets,
            class_counts=self._class_counts,
            dataset_index=dataset_index,
        )

    @cached_property
    def _order(self) -> np.ndarray:
        di = self._layout.dataset_index
        return di[di >= 0]

    @cached_property
    def _row_of(self) -> np.ndarray:
        rows = np.empty(len(self), dtype=np.int64)
        di = self._layout.dataset_index
        valid = np.flatnonzero(di >= 0)
        rows[di[valid]] = valid
        return rows

    @cached_property
    def _storage_labels(self) -> np.ndarray:
        with self._io("read the labels of"):
            return np.asarray(self._group["labels"][:], dtype=np.int64)

    @cached_property
    def _storage_ids(self) -> list[str]:
        with self._io("read the image ids of"):
            return [str(s) for s in self._group["image_ids"][:]]

    @property
    def order(self) -> np.ndarray:
        """``[n]`` int64: the dataset indices in storage order (class-contiguous; dataset order within a class)."""
        return self._order.copy()

    def row_of(self, dataset_index: int) -> int:
        """The storage row of dataset image ``dataset_index``."""
        i = check_index("dataset_index", dataset_index, len(self))
        return int(self._row_of[i])

    @property
    def labels(self) -> torch.Tensor:
        """``[n]`` int64 labels in dataset order (as given to :meth:`create`)."""
        out = np.empty(len(self), dtype=np.int64)
        di = self._layout.dataset_index
        valid = di >= 0
        out[di[valid]] = self._storage_labels[valid]
        return torch.from_numpy(out)

    @property
    def image_ids(self) -> list[str]:
        """``[n]`` image ids in dataset order (as given to :meth:`create`)."""
        out = [""] * len(self)
        for row, i in enumerate(self._layout.dataset_index):
            if i >= 0:
                out[i] = self._storage_ids[row]
        return out

    def class_rows(self, c: int) -> tuple[int, int]:
        """Storage rows ``(start, stop)`` of class ``c``'s images; ``start`` is a chunk boundary."""
        c = check_index("class index", c, self._schema.n_classes)
        start = int(self._class_offsets[c])
        return start, start + int(self._class_counts[c])

    def class_chunks(self, c: int) -> list[int]:
        """The chunk indices holding class ``c`` (empty for a class without images)."""
        c = check_index("class index", c, self._schema.n_classes)
        return list(range(int(self._class_offsets[c]) // self._ipc, int(self._class_offsets[c + 1]) // self._ipc))

    def chunk_rows(self, chunk_index: int) -> tuple[int, int]:
        """Storage rows ``(start, stop)`` of chunk ``chunk_index``'s images (``stop - start`` = the ``m`` that
        :meth:`write_chunk` expects; ``start = chunk_index * images_per_chunk``; rows up to the next chunk
        boundary are padding)."""
        k = check_index("chunk_index", chunk_index, self.n_chunks)
        start = k * self._ipc
        c = int(np.searchsorted(self._class_offsets, start, side="right")) - 1
        return start, min(start + self._ipc, int(self._class_offsets[c] + self._class_counts[c]))

    def chunk_indices(self, chunk_index: int) -> np.ndarray:
        """``[m]`` int64: the dataset indices whose features :meth:`write_chunk` expects for ``chunk_index``."""
        start, stop = self.chunk_rows(chunk_index)
        return self._layout.dataset_index[start:stop].copy()

    # -- plumbing ----------------------------------------------------------------------------------------------------

    def _array(self, name: str) -> zarr.Array:
        # Arrays are opened once (one metadata read each) and kept.
        cache = self.__dict__.setdefault("_arrays", {})
        if name not in cache:
            with self._io(f"open array {name!r} of"):
                arr = self._group[name]
            # Runtime config, not stored metadata: every opened handle needs it. Chunks are always written whole, so
            # zarr's all-fill-value scan of each one (a full pass, on its event-loop thread) buys nothing.
            cache[name] = arr.with_config({"write_empty_chunks": True}) if name == "features" else arr
        return cache[name]

    @contextmanager
    def _io(self, action: str, *, write: bool = False) -> Iterator[None]:
        # `action` reads "<verb> ... of/in/from", completed with the store's location by _io().
        with storage_errors(action, self._loc, self._options, self._secrets, write=write):
            yield
