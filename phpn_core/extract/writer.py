"""Background writer threads: check, encode and write finished chunks while the calling thread computes the next."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from phpn_core.storage.feature_store import FeatureStore

__all__ = ["ChunkJob", "ChunkWriter", "WRITERS", "QUEUE_DEPTH"]

# Writer threads, and chunks queued for or being written (bounds host memory: <= 6 x 4 MiB chunks). Several writers
# overlap each chunk's fixed storage latency (two sequential store calls; on S3 two rounds of PUTs of ~10-50 ms): one
# writer would cap S3 at ~20 chunks/s, below what a GPU produces. Locally they are idle most of the time.
WRITERS = 4
QUEUE_DEPTH = 6
_POLL_S = 0.1  # how often a blocked queue operation looks for a writer failure


@dataclass
class ChunkJob:
    """One chunk for the writer: its rows as CPU tensors, in row order (concatenated by the writer)."""

    chunk: int
    n: int
    feats: list[torch.Tensor] = field(default_factory=list)  # [b, h, w, D] each, channels last (maybe a view)
    kps: list[torch.Tensor] = field(default_factory=list)  # [b, P, 3] float32 each; empty without keypoints
    buffer: torch.Tensor | None = None  # CUDA: the pinned host buffer the rows were copied into (recycled)
    event: Any = None  # CUDA: recorded after the device -> host copies



def _rows(parts: list[torch.Tensor]) -> np.ndarray:
    # One part (the common case: a chunk is one batch): a zero-copy, possibly strided, view; write_chunk encodes a
    # whole chunk already in the store's layout and dtype straight from it, else its copy into the chunk block
    # transposes and casts. Several parts: concatenated here, off the compute thread.
    if len(parts) == 1:
        return parts[0].numpy()
    return np.concatenate([p.numpy() for p in parts])


class ChunkWriter:
    """Background writers: ``n_threads`` threads take :class:`ChunkJob` s from ``jobs`` and write them; at most ``depth``
    jobs are queued or being written (bounded memory). Chunks are independent objects, so several are written at
    once: the fixed latency of each chunk's storage round trips (two store calls, thread hand-offs, S3 requests)
    then overlaps instead of adding up. Pinned buffers are recycled into ``free``; ``(chunk, n, min, max)`` is
    reported in ``done`` (the min and max of the values written). The first exception is kept in ``error`` (the
    thread that raised it stops; the others finish the jobs already queued, which are correct, so that as much as
    possible is kept for a resume)."""

    def __init__(self, store: FeatureStore, *, n_threads: int = WRITERS, depth: int = QUEUE_DEPTH) -> None:
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

    def put(self, job: ChunkJob) -> None:
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
