"""Reading a feature store: a class's features, keypoints, ids and dataset indices, and the write progress."""

from __future__ import annotations

import numpy as np
import torch

from phpn_core.errors import StoreError
from phpn_core.method.rows import RowSource

__all__ = ["ClassReads", "StoreRows"]


class StoreRows(RowSource):
    """Class ``c``'s feature rows ``[n_c H W, D]`` read from the store in blocks of whole chunks, in the storage
    dtype (no float32 copy of the class: the solver casts each block). Reading again re-reads the store, so the
    memory held is one block, whatever the class size. Made by :meth:`ClassReads.class_row_source`."""

    def __init__(self, store, c: int):
        self.store, self.c = store, int(c)
        self.start, self.stop = store.class_rows(self.c)
        H, W, D = store.schema.feature_shape
        self.hw, self.dim = H * W, D
        self.n_rows = (self.stop - self.start) * self.hw
        self.dtype = getattr(torch, np.dtype(store.schema.dtype).name)

    def blocks(self, block_rows: int):
        ipc = self.store.images_per_chunk
        # whole chunks per block where a chunk fits in one (Zarr decodes whole chunks anyway), else part of one:
        # the block bound holds whatever the store's chunking
        images = max(1, block_rows // self.hw)
        if images >= ipc:
            images = (images // ipc) * ipc
        arr = self.store._array("features")
        first = self.start
        while first < self.stop:
            # blocks end on chunk boundaries (the class starts on one)
            last = min(self.stop, first + images)
            with self.store._io(f"read class {self.c}'s features from"):
                block = np.asarray(arr[first:last])
            yield (first - self.start) * self.hw, torch.from_numpy(block).reshape(-1, self.dim)
            first = last


class ClassReads:
    """The reading half of :class:`~phpn_core.storage.feature_store.FeatureStore` (a mixin: it uses the store's
    ``class_rows``, ``class_chunks``, ``_layout``, ``_storage_ids``, ``_kp_shape``, ``_array`` and ``_io``)."""

    def missing_chunks(self) -> list[int]:
        """Chunk indices not yet completely written, ascending."""
        with self._io("read the progress of"):
            done = np.asarray(self._array("done")[:], dtype=bool)
        return [int(k) for k in np.flatnonzero(~done)]

    @property
    def is_complete(self) -> bool:
        """True when every chunk has been written."""
        return not self.missing_chunks()

    def class_features(self, c: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Features of class ``c``'s images, ``[n_c, H, W, D]`` in ``dtype`` (float32 by default, whatever the
        storage dtype), in dataset order. Reads only class ``c``'s chunks. Raises StoreError if any is unwritten."""
        start, stop = self.class_rows(c)
        self._require_done(int(c), "features")
        with self._io(f"read class {int(c)}'s features from"):
            arr = self._array("features")[start:stop]
        return torch.from_numpy(np.asarray(arr)).to(dtype)

    def class_row_source(self, c: int) -> StoreRows:
        """Class ``c``'s features as a :class:`~phpn_core.method.rows.RowSource` (``[n_c H W, D]`` in row blocks
        of whole chunks, storage dtype) for :func:`~phpn_core.method.decompose.decompose_head`: a class of any size
        in the memory of one block. Raises StoreError if any of its chunks is unwritten."""
        self._require_done(int(c), "features")
        return StoreRows(self, int(c))

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
