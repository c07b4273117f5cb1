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
from pydantic import ValidationError

from phpn_core.errors import (
    InputValueError,
    PhpnError,
    SchemaMismatchError,
    ShapeError,
    StoreError,
)
from phpn_core.storage.chunkio import ChunkEncoder, gather_settled, put_chunks
from phpn_core.storage.schema import (
    _ATTR_KEY,
    _INDEX_CHUNK_ROWS,
    _KIND,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    Compression,
    FeatureSchema,
    _compressors,
    _Layout,
    default_images_per_chunk,
)
from phpn_core.storage.uri import (
    StorageLocation,
    parse_uri,
    redact,
    resolve_storage_options,
)

__all__ = ["FORMAT_VERSION", "FeatureSchema", "FeatureStore", "IDENTITY_FIELDS", "default_images_per_chunk"]


class FeatureStore:
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
        _layout: _Layout | None = None,
    ) -> None:
        # Private: use create() or open().
        # True when create() has just built this store new: nothing is written yet, so progress need not be read.
        self.created_empty = False
        self._loc = _loc
        self._options = _options
        self._group = _group
        self._meta = _meta
        self._schema = _schema
        self._secrets = _secrets_of(_options)
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
        label_arr = _check_labels(labels, schema)
        ids = _check_image_ids(image_ids, schema.n_images)
        kp_shape = _check_keypoints_shape(keypoints_shape, schema)
        counts = np.bincount(label_arr, minlength=schema.n_classes)
        itemsize = np.dtype(schema.dtype).itemsize
        if images_per_chunk is None:
            ipc = default_images_per_chunk(counts, math.prod(schema.feature_shape) * itemsize)
        else:
            ipc = _check_positive_int("images_per_chunk", images_per_chunk)
        codecs = _compressors(compression)
        secrets = _secrets_of(opts)
        with _io("connect to", loc, opts, secrets, write=True):  # bad storage options fail here
            zstore = _zarr_store(loc, opts, read_only=False)

        if not overwrite:
            with _io("look for an existing feature store at", loc, opts, secrets, write=False):
                existing = _probe(zstore, redact(loc.url, secrets=secrets))
            if existing is not None:
                store = cls._resume(loc, opts, existing, schema, label_arr, ids, kp_shape, images_per_chunk)
                if store is not None:
                    return store
                # else: creation of the existing store was interrupted before its layout was complete; rebuild.

        layout = _Layout.build(label_arr, schema.n_classes, ipc)
        meta = {
            "kind": _KIND,
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
        index_chunks = (max(1, min(R, _INDEX_CHUNK_ROWS)),)
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
        with _io("create the feature store at", loc, opts, secrets, write=True):
            group = _create_group(zstore, meta, arrays)
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
        shown = redact(loc.url, secrets=_secrets_of(opts))
        if meta is None:
            raise StoreError(
                f"Something that is not a phpn feature store already exists at {shown}: expected an empty location "
                "or a feature store, got a Zarr node without phpn metadata. Fix: choose another URI, or pass "
                "overwrite=True to delete it."
            )
        stored = _schema_from_meta(meta, shown)
        want, got = schema.fingerprint(), meta.get("fingerprint")
        if want != got:
            raise SchemaMismatchError(
                f"Feature store at {shown} holds different features: expected fingerprint {want}, found {got} "
                f"(differing fields, requested vs stored: {_fmt_diff(schema.identity_diff(stored))}). "
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
                f"{_fmt_diff(problems)} (requested vs stored). Fix: pass overwrite=True to rebuild it, or request "
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
        secrets = _secrets_of(opts)
        shown = redact(loc.url, secrets=secrets)
        with _io("open the feature store at", loc, opts, secrets, write=False):
            zstore = _zarr_store(loc, opts, read_only=False)
            existing = _probe(zstore, shown)
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
                f"{_ATTR_KEY!r}, got none. Fix: point to the store's root, or recreate it with FeatureStore.create."
            )
        schema = _schema_from_meta(meta, shown)
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
    def _layout(self) -> _Layout:
        with self._io("read the index of"):
            dataset_index = np.asarray(self._group["dataset_index"][:], dtype=np.int64)
        return _Layout(
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
        i = _check_index("dataset_index", dataset_index, len(self))
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
        c = _check_index("class index", c, self._schema.n_classes)
        start = int(self._class_offsets[c])
        return start, start + int(self._class_counts[c])

    def class_chunks(self, c: int) -> list[int]:
        """The chunk indices holding class ``c`` (empty for a class without images)."""
        c = _check_index("class index", c, self._schema.n_classes)
        return list(range(int(self._class_offsets[c]) // self._ipc, int(self._class_offsets[c + 1]) // self._ipc))

    def chunk_rows(self, chunk_index: int) -> tuple[int, int]:
        """Storage rows ``(start, stop)`` of chunk ``chunk_index``'s images (``stop - start`` = the ``m`` that
        :meth:`write_chunk` expects; ``start = chunk_index * images_per_chunk``; rows up to the next chunk
        boundary are padding)."""
        k = _check_index("chunk_index", chunk_index, self.n_chunks)
        start = k * self._ipc
        c = int(np.searchsorted(self._class_offsets, start, side="right")) - 1
        return start, min(start + self._ipc, int(self._class_offsets[c] + self._class_counts[c]))

    def chunk_indices(self, chunk_index: int) -> np.ndarray:
        """``[m]`` int64: the dataset indices whose features :meth:`write_chunk` expects for ``chunk_index``."""
        start, stop = self.chunk_rows(chunk_index)
        return self._layout.dataset_index[start:stop].copy()

    # -- writing ----------------------------------------------------------------------------------------------------

    def write_chunk(
        self,
        chunk_index: int,
        features: torch.Tensor | np.ndarray,
        *,
        keypoints: torch.Tensor | np.ndarray | None = None,
    ) -> tuple[float, float]:
        """Write one chunk and mark it done; returns the (min, max) of the feature values stored (as stored: after the
        cast to the schema's dtype; (0.0, 0.0) for a chunk of padding only).

        ``features [m, H, W, D]`` (tensor on any device, or array; cast to the schema's dtype) and, when the store
        has keypoints, ``keypoints [m, P, 3]``, for the images ``chunk_indices(chunk_index)`` in that order
        (``m = stop - start`` of :meth:`chunk_rows`). Data is written first and the done marker last, so an
        interrupted call leaves the chunk missing and it is rewritten on resume. Rewriting a done chunk is allowed.
        """
        start, stop = self.chunk_rows(chunk_index)
        k, m = int(chunk_index), stop - start
        H, W, D = self._schema.feature_shape
        arr = _as_array(features, "features")
        if arr.shape != (m, H, W, D):
            raise ShapeError(
                f"features for chunk {k} have the wrong shape: expected [m, H, W, D] = {[m, H, W, D]} "
                f"(the {m} images chunk_indices({k}) in that order), got {list(arr.shape)}. "
                "Fix: extract exactly those images, channels last."
            )
        if m == self._ipc and arr.dtype == np.dtype(self._schema.dtype) and arr.flags.c_contiguous:
            block = arr  # a whole chunk, already as stored: encoded straight from it (only read, never modified)
        else:
            block = np.empty((self._ipc, H, W, D), dtype=self._schema.dtype)
            block[m:] = 0
            _copy_into(block[:m], arr)  # casts and/or transposes (a copy: the caller's data is never touched)
        # min and max propagate NaN and reach inf whenever one value is: one pass checks finiteness and gives the
        # stats (torch's aminmax: a single pass that releases the GIL).
        lo, hi = _min_max(block[:m])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            overflow = np.isfinite(arr).all()
            raise InputValueError(
                f"features for chunk {k} are not finite: expected finite values, got "
                + (
                    f"values beyond float16's range (max |x| = {float(np.abs(arr).max()):.4g} > 65504). "
                    "Fix: store as float32 (FeatureSchema(dtype='float32')) or rescale the features."
                    if overflow
                    else f"{int((~np.isfinite(arr)).sum())} NaN/inf values. Fix: check the backbone and its inputs."
                )
            )
        kblock = None
        if self._kp_shape is not None:
            P = self._kp_shape[0]
            if keypoints is None:
                raise InputValueError(
                    f"keypoints for chunk {k} are missing: this store holds keypoints [n, {P}, 3], got None. "
                    f"Fix: pass keypoints=[m, {P}, 3] for the same images as the features."
                )
            karr = _as_array(keypoints, "keypoints")
            if karr.shape != (m, P, 3):
                raise ShapeError(
                    f"keypoints for chunk {k} have the wrong shape: expected [m, P, 3] = {[m, P, 3]}, got "
                    f"{list(karr.shape)}. Fix: pass rows (x, y, visible) for the images chunk_indices({k})."
                )
            if not np.isfinite(karr).all():
                raise InputValueError(
                    f"keypoints for chunk {k} are not finite: expected finite (x, y, visible) rows, got NaN/inf. "
                    "Fix: write invisible parts as (0, 0, 0)."
                )
            kblock = np.zeros((self._ipc, P, 3), dtype=np.float32)
            kblock[:m] = karr
        elif keypoints is not None:
            raise InputValueError(
                f"keypoints given for chunk {k} but this store holds none: expected keypoints=None, got an array. "
                "Fix: drop them, or create the store with keypoints_shape=(P, 3)."
            )
        with self._io(f"write chunk {k} of", write=True):
            # The whole chunk (padding included; store chunk k is zarr chunk k along the rows): one object per
            # array, no read-modify-write.
            parts = [("features", (k, 0, 0, 0), block)]
            if kblock is not None:
                parts.append(("keypoints", (k, 0, 0), kblock))
            self._put(parts)
        self._mark_done(k)
        return lo, hi

    def _mark_done(self, k: int) -> None:
        with self._io(f"mark chunk {k} done in", write=True):
            self._put([("done", (k,), np.ones(1, dtype=bool))])

    def _put(self, parts: list[tuple[str, tuple[int, ...], np.ndarray]]) -> None:
        """Write whole chunks ``(array name, chunk coords, block)``: encoded here (in the calling thread, GIL released
        by the codecs) and stored by :func:`~phpn_core.storage.chunkio.put_chunks`; through zarr's own ``__setitem__`` for
        codec chains chunkio does not know."""
        encoders = [self._encoder(name) for name, _, _ in parts]
        if all(e is not None for e in encoders):
            put_chunks([(e, coords, e.encode(block)) for e, (_, coords, block) in zip(encoders, parts)])
            return
        for name, coords, block in parts:
            arr = self._array(name)
            sel = tuple(slice(i * n, (i + 1) * n) for i, n in zip(coords, arr.chunks))
            arr[sel] = block

    def _encoder(self, name: str) -> ChunkEncoder | None:
        cache = self.__dict__.setdefault("_encoders", {})
        if name not in cache:
            cache[name] = ChunkEncoder.for_array(self._array(name))
        return cache[name]

    def missing_chunks(self) -> list[int]:
        """Chunk indices not yet completely written, ascending."""
        with self._io("read the progress of"):
            done = np.asarray(self._array("done")[:], dtype=bool)
        return [int(k) for k in np.flatnonzero(~done)]

    @property
    def is_complete(self) -> bool:
        """True when every chunk has been written."""
        return not self.missing_chunks()

    # -- reading ------------------------------------------------------------------------------------------------------

    def class_features(self, c: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Features of class ``c``'s images, ``[n_c, H, W, D]`` in ``dtype`` (float32 by default, whatever the
        storage dtype), in dataset order. Reads only class ``c``'s chunks. Raises StoreError if any is unwritten."""
        start, stop = self.class_rows(c)
        self._require_done(int(c), "features")
        with self._io(f"read class {int(c)}'s features from"):
            arr = self._array("features")[start:stop]
        return torch.from_numpy(np.asarray(arr)).to(dtype)

    def class_keypoints(self, c: int) -> torch.Tensor | None:
        """Keypoints of class ``c``'s images, ``[n_c, P, 3]`` float32 rows ``(x, y, visible)``; None if the store
        has none."""
        start, stop = self.class_rows(c)
        if self._kp_shape is None:
            return None
        self._require_done(int(c), "keypoints")
        with self._io(f"read class {int(c)}'s keypoints from"):
            arr = self._array("keypoints")[start:stop]
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))

    def class_image_ids(self, c: int) -> list[str]:
        """Image ids of class ``c``'s images ``[n_c]``, in storage (= dataset) order."""
        start, stop = self.class_rows(c)
        return list(self._storage_ids[start:stop])

    def class_indices(self, c: int) -> np.ndarray:
        """``[n_c]`` int64: the dataset indices of class ``c``'s images, in storage order."""
        start, stop = self.class_rows(c)
        return self._layout.dataset_index[start:stop].copy()

    def _require_done(self, c: int, what: str) -> None:
        chunks = self.class_chunks(c)
        if not chunks:
            return
        with self._io(f"read the progress of class {c} in"):
            done = np.asarray(self._array("done")[chunks[0] : chunks[-1] + 1], dtype=bool)
        if not done.all():
            missing = [chunks[0] + int(i) for i in np.flatnonzero(~done)]
            raise StoreError(
                f"Class {c}'s {what} in the feature store at {self.uri} are incomplete: expected all of chunks "
                f"{chunks[0]}..{chunks[-1]} written, got chunks {missing} missing. Fix: finish (resume) the "
                "extraction: write every chunk in store.missing_chunks()."
            )

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
        with _io(action, self._loc, self._options, self._secrets, write=write):
            yield


# ------------------------------------------------------------------------------------------------------------------
# helpers


def _create_group(
    zstore: zarr.abc.store.Store, meta: dict[str, Any], arrays: list[tuple[str, dict[str, Any], np.ndarray | None]]
) -> zarr.Group:
    """Create the group (deleting whatever is there: mode "w") and its arrays concurrently, write the arrays that
    have data, then set ``layout_complete`` (an interrupted create is detected by its absence and rebuilt). One call
    into zarr's event loop: ~10 sequential metadata writes become one concurrent batch (on S3, one round trip's
    latency instead of ten)."""
    from zarr.api.asynchronous import open_group
    from zarr.core.sync import sync

    async def build() -> zarr.Group:
        group = await open_group(store=zstore, mode="w", zarr_format=3, attributes={_ATTR_KEY: meta})
        made = await gather_settled(group.create_array(name, **opts) for name, opts, _ in arrays)
        await gather_settled(a.setitem(slice(None), data) for a, (_, _, data) in zip(made, arrays) if data is not None)
        await group.update_attributes({_ATTR_KEY: {**meta, "layout_complete": True}})
        return zarr.Group(group)

    return sync(build())


def _zarr_store(loc: StorageLocation, opts: dict[str, Any] | None, *, read_only: bool) -> zarr.abc.store.Store:
    if loc.is_remote:
        return zarr.storage.FsspecStore.from_url(loc.url, storage_options=opts, read_only=read_only)
    return zarr.storage.LocalStore(loc.path, read_only=read_only)


def _probe(zstore: zarr.abc.store.Store, shown: str) -> tuple[zarr.Group, dict[str, Any] | None] | None:
    """The group at the store's root and its phpn metadata (None if it has none); None if nothing is there."""
    try:
        group = zarr.open_group(store=zstore, mode="r+", zarr_format=3, use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one; so is a missing bucket
        return None
    except zarr.errors.ContainsArrayError:
        raise StoreError(
            f"A Zarr array (not a group) exists at {shown}: expected a feature store group or nothing."
            " Fix: choose another URI, or pass overwrite=True to FeatureStore.create to replace it."
        ) from None
    meta = group.attrs.get(_ATTR_KEY)
    if not isinstance(meta, dict) or meta.get("kind") != _KIND:
        return group, None
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"Feature store at {shown} has format {meta.get('format_version')!r}, which is not supported: "
            f"expected format {FORMAT_VERSION}. Fix: re-extract the features with this phpn version (overwrite=True)."
        )
    return group, meta


def _schema_from_meta(meta: dict[str, Any], shown: str) -> FeatureSchema:
    try:
        return FeatureSchema.model_validate(meta["schema"])
    except (KeyError, ValidationError) as e:
        raise StoreError(
            f"Feature store at {shown} has unreadable metadata: expected a valid FeatureSchema under "
            f"attributes[{_ATTR_KEY!r}]['schema'], got an error: {redact(str(e))}. Fix: recreate the store with "
            "FeatureStore.create(..., overwrite=True)."
        ) from None


def _secrets_of(opts: Mapping[str, Any] | None) -> tuple[str, ...]:
    if not opts:
        return ()
    return tuple(str(opts[k]) for k in ("key", "secret", "token") if opts.get(k))


@contextmanager
def _io(
    action: str, loc: StorageLocation, opts: dict[str, Any] | None, secrets: tuple[str, ...], *, write: bool
) -> Iterator[None]:
    """Turn I/O failures (OS, botocore, aiohttp, zarr) into a StoreError that names the location and endpoint and
    never a credential. The original exception is not chained: its text is included, redacted."""
    try:
        yield
    except PhpnError:
        raise
    except Exception as e:
        shown = redact(loc.url, secrets=secrets)
        detail = redact(f"{type(e).__name__}: {e}", secrets=secrets)
        if loc.is_remote:
            endpoint = redact(str((opts or {}).get("endpoint_url") or "the default AWS endpoint"), secrets=secrets)
            where = f"{shown} (endpoint {endpoint})"
            fix = (
                "check that the endpoint is up and reachable (storage_options['endpoint_url'] / AWS_ENDPOINT_URL), "
                f"that bucket {loc.bucket!r} exists and that the credentials may {'write' if write else 'read'} it"
            )
        else:
            where = shown
            fix = f"check that the path is {'writable and the disk not full' if write else 'readable'}"
        raise StoreError(
            f"Could not {action} {where}: expected the storage to answer, got {detail}. Fix: {fix}."
        ) from None


def _torch_view(a: np.ndarray) -> torch.Tensor | None:
    """A zero-copy tensor over ``a``, or None where torch cannot (or should not) view it: negative strides, dtypes
    torch lacks, read-only arrays (torch warns on each of those)."""
    if not a.flags.writeable:
        return None
    try:
        return torch.from_numpy(a)
    except (ValueError, TypeError):
        return None


def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` with the cast: torch's copy (vectorised float16 conversion, GIL released: ~20x faster than
    numpy's, which holds the GIL and so slows a forward pass running in another thread); numpy for what torch cannot
    view. Overflow to float16 gives inf, as numpy's cast does (the caller checks finiteness)."""
    t_src, t_dst = _torch_view(src), _torch_view(dst)
    if t_src is not None and t_dst is not None:
        t_dst.copy_(t_src)
        return
    with np.errstate(over="ignore", invalid="ignore"):
        dst[...] = src


def _min_max(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``a`` in one pass (torch's aminmax, GIL released; numpy's two passes where torch cannot view
    it); NaN anywhere gives NaN and inf reaches the max or min, so the result also tells whether all is finite.
    (0.0, 0.0) for an empty array."""
    if a.size == 0:
        return 0.0, 0.0
    t = _torch_view(a)
    if t is None:
        return float(a.min()), float(a.max())
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16
        arr = t.numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise InputValueError(
            f"{name} must be real numbers: expected a float or integer tensor/array, got dtype {arr.dtype}. "
            f"Fix: convert {name} to float32."
        )
    return arr


def _check_labels(labels: Any, schema: FeatureSchema) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().to("cpu").numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != schema.n_images:
        raise ShapeError(
            f"labels have the wrong shape: expected [n_images] = [{schema.n_images}], got {list(arr.shape)}. "
            "Fix: pass one label per image, in dataset order (schema.n_images must match)."
        )
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr))):
        raise InputValueError(
            f"labels must be integers: expected class indices in [0, {schema.n_classes}), got dtype {arr.dtype}. "
            "Fix: pass integer class indices."
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= schema.n_classes:
        raise InputValueError(
            f"labels out of range: expected class indices in [0, {schema.n_classes}), got values in "
            f"[{int(arr.min())}, {int(arr.max())}]. Fix: map labels to 0..n_classes-1 or correct n_classes."
        )
    return arr


def _check_image_ids(image_ids: Any, n: int) -> list[str]:
    if isinstance(image_ids, str) or not isinstance(image_ids, (Sequence, np.ndarray)):
        raise InputValueError(
            f"image_ids must be a sequence of strings, got {type(image_ids).__name__}. Fix: pass a list of ids."
        )
    ids = list(image_ids)
    if len(ids) != n:
        raise ShapeError(
            f"image_ids have the wrong length: expected [n_images] = [{n}], got [{len(ids)}]. "
            "Fix: pass one id per image, in dataset order."
        )
    bad = next((i for i, s in enumerate(ids) if not isinstance(s, str) or not s), None)
    if bad is not None:
        raise InputValueError(
            f"image_ids must be non-empty strings: got {ids[bad]!r} at index {bad}. Fix: give every image an id."
        )
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(s for s in ids if s in seen or seen.add(s))
        raise InputValueError(
            f"image_ids must be unique: expected {n} distinct ids, got {len(set(ids))} (e.g. {dup!r} repeats). "
            "Fix: make the ids unique within the dataset."
        )
    return ids


def _check_keypoints_shape(keypoints_shape: Any, schema: FeatureSchema) -> tuple[int, int] | None:
    if keypoints_shape is None:
        return None
    shape = (keypoints_shape, 3) if isinstance(keypoints_shape, (int, np.integer)) else tuple(keypoints_shape)
    if (
        len(shape) != 2
        or shape[1] != 3
        or isinstance(shape[0], bool)
        or not isinstance(shape[0], (int, np.integer))
        or shape[0] < 1
    ):
        raise ShapeError(
            f"keypoints_shape is invalid: expected P or (P, 3) with P >= 1 parts, got {keypoints_shape!r}. "
            "Fix: pass the number of parts, e.g. keypoints_shape=(15, 3)."
        )
    P = int(shape[0])
    if schema.part_names is not None and len(schema.part_names) != P:
        raise ShapeError(
            f"keypoints_shape disagrees with the schema: expected P = len(part_names) = {len(schema.part_names)}, "
            f"got P = {P}. Fix: make part_names and the keypoints agree."
        )
    return P, 3


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1, got {value!r}. Fix: pass e.g. 16, or None for the default.")
    return int(value)


def _check_index(name: str, value: Any, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputValueError(f"{name} must be an int, got {type(value).__name__}. Fix: pass an int in [0, {size}).")
    if not 0 <= value < size:
        raise InputValueError(
            f"{name} out of range: expected an int in [0, {size}), got {int(value)}. Fix: pass a valid index."
        )
    return int(value)


def _fmt_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    if not diff:
        return "none of the identity fields (fingerprint format changed)"
    return ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
