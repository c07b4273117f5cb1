"""Writing a feature store: one whole chunk at a time, data first and its done marker last (see
:mod:`phpn_core.storage.feature_store` for the layout and the resume rule)."""

from __future__ import annotations

import math

import numpy as np
import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.storage.chunkio import ChunkEncoder, put_chunks
from phpn_core.storage.feature_checks import as_array

__all__ = ["ChunkWrites"]


class ChunkWrites:
    """The writing half of :class:`~phpn_core.storage.feature_store.FeatureStore` (a mixin: it uses the store's
    ``chunk_rows``, ``_schema``, ``_ipc``, ``_kp_shape``, ``_array`` and ``_io``)."""

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
        arr = as_array(features, "features")
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
            karr = as_array(keypoints, "keypoints")
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
