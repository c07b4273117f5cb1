"""Whole-chunk writes to a Zarr v3 array without zarr's per-call indexing machinery.

``array[a:b] = block`` for one whole chunk goes through zarr's selection indexing, a merge into a fresh chunk
buffer, a fill-value scan and several event-loop hand-offs: on a 3 MiB feature chunk that is ~5 ms of Python work
holding the GIL, on top of the codec itself. During extraction that work competes with the forward pass for the
GIL (every torch op re-acquires it), which is what kept extraction of small models below the bare forward pass.

:class:`ChunkEncoder` encodes a whole chunk exactly as zarr's codec pipeline does (the same numcodecs codecs with the
array's own configuration: the stored bytes are identical, see ``tests/storage/test_chunkio.py``), and :func:`put_chunks`
stores them: local files written directly, remote objects in one event-loop call. The codecs release the GIL, so
the encode runs in parallel with the compute thread. Arrays whose codec chain is not one this module knows (sharding,
filters, other compressors) get no encoder: callers fall back to zarr's own ``__setitem__``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import zarr

__all__ = ["ChunkEncoder", "gather_settled", "put_chunks"]

T = TypeVar("T")

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ChunkEncoder:
    """Encodes whole chunks ``[*chunk_shape]`` of one Zarr v3 array into the bytes zarr would store for them.

    Build it with :meth:`for_array` (None when the array's codec chain is not supported).
    """

    def __init__(self, array: zarr.Array, compress: Callable[[np.ndarray], bytes] | None) -> None:
        self.array = array
        self.chunk_shape = tuple(int(c) for c in array.chunks)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self._compress = compress

    @classmethod
    def for_array(cls, array: zarr.Array) -> ChunkEncoder | None:
        """The encoder for ``array``'s codecs ``bytes(little endian) [+ zstd | blosc]``; None for anything else."""
        from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

        if array.metadata.zarr_format != 3:
            return None
        codecs = tuple(array.metadata.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        endian = codecs[0].endian
        if endian is not None and getattr(endian, "value", endian) != "little":
            return None
        if len(codecs) == 1:
            return cls(array, None)
        if len(codecs) != 2:
            return None
        c = codecs[1]
        if isinstance(c, ZstdCodec):
            from numcodecs import Zstd

            return cls(array, Zstd(level=c.level, checksum=c.checksum).encode)
        if isinstance(c, BloscCodec):
            from numcodecs import Blosc

            blosc = Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=_SHUFFLE[c.shuffle.value],
                          blocksize=c.blocksize, typesize=c.typesize)
            return cls(array, blosc.encode)
        return None

    def key(self, chunk_coords: Sequence[int]) -> str:
        """The chunk's key relative to the array (e.g. ``c/3/0/0/0``)."""
        return self.array.metadata.encode_chunk_key(tuple(int(c) for c in chunk_coords))

    def encode(self, block: np.ndarray) -> bytes | memoryview:
        """``block [*chunk_shape]`` (cast to the array's dtype if needed) -> the chunk's stored bytes."""
        if tuple(block.shape) != self.chunk_shape:
            raise ValueError(f"a whole chunk has shape {list(self.chunk_shape)}, got {list(block.shape)}")
        raw = np.ascontiguousarray(block, dtype=self.dtype)
        if self._compress is None:
            return memoryview(raw).cast("B")
        return self._compress(raw)


def put_chunks(items: Sequence[tuple[ChunkEncoder, Sequence[int], bytes | memoryview]]) -> None:
    """Store encoded chunks ``(encoder, chunk coords, bytes)``; returns when all are stored (raises the first error).

    On a local store the files are written here, as zarr's ``LocalStore`` writes them (a temporary file renamed over
    the chunk's path, so a reader never sees half a chunk), with no event-loop round trip: the write syscalls release
    the GIL. Other stores (S3) get all the objects in one call into zarr's event loop, concurrently.
    """
    remote = []
    for enc, coords, data in items:
        sp = enc.array.store_path
        root = _local_root(sp.store)
        key = enc.key(coords)
        if root is None:
            remote.append((sp / key, data))
        else:
            _write_file(root / sp.path / key if sp.path else root / key, data)
    if remote:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        proto = default_buffer_prototype()

        async def _put() -> None:
            await gather_settled(path.set(proto.buffer.from_bytes(data)) for path, data in remote)

        sync(_put())


async def gather_settled(aws: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that lets every awaitable finish before raising the first error: nothing of a failed call is
    still writing after it has returned (plain gather leaves the siblings of a failure running on zarr's loop, where
    they can race a retry's delete-and-recreate)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def _local_root(store: object) -> Path | None:
    from zarr.storage import LocalStore

    if isinstance(store, LocalStore) and not store.read_only:
        return Path(store.root)
    return None


def _write_file(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
