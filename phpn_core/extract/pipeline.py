"""One extraction pass over a list of chunks: DataLoader -> forward pass in the calling thread -> writer threads."""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from phpn_core.data.base import normalize
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.extract.checks import DTYPES
from phpn_core.extract.contract import contract_error, norm_stat, sample_image
from phpn_core.extract.writer import QUEUE_DEPTH, ChunkJob, ChunkWriter
from phpn_core.storage.feature_store import FeatureStore

__all__ = ["ChunkWritten", "ExtractionPass", "channels_last_weights", "collate"]

log = logging.getLogger("phpn_core.extract")


@dataclass(frozen=True)
class ChunkWritten:
    """Passed to ``on_chunk`` after chunk ``chunk_index`` (``n_images`` images) has been written and marked done;
    ``chunks_done`` of this call's ``chunks_todo`` chunks are written so far."""

    chunk_index: int
    n_images: int
    chunks_done: int
    chunks_todo: int



@contextlib.contextmanager
def channels_last_weights(features: nn.Module, *, enabled: bool) -> Iterator[None]:
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



class ExtractionPass:
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
        self.st_dtype = DTYPES[s.dtype]
        self.mean, self.std = norm_stat(dataset, "mean"), norm_stat(dataset, "std")
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

    def _pinned_buffer(self, writer: ChunkWriter) -> torch.Tensor:
        # CUDA: a small pool of page-locked host buffers [ipc, h, w, D], recycled by the writer (pinned memory is
        # costly to allocate, and the pool bounds host memory).
        if self.n_buffers < QUEUE_DEPTH + 2:
            self.n_buffers += 1
            return torch.empty((self.store.images_per_chunk, *self.fshape), dtype=self.st_dtype, pin_memory=True)
        return writer.take_buffer()

    def _report(self, writer: ChunkWriter, total_chunks: int, bar: Any, task: Any) -> None:
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
            collate_fn=collate,
            pin_memory=self.cuda,
        )
        it = iter(loader)  # starts the workers before any thread of ours exists (they are forked)
        writer = ChunkWriter(self.store)
        bar, task = _progress_bar(self.progress, n_images, self.store.uri)
        h, w, D = self.fshape
        job = ChunkJob(-1, 0)
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
                        job = ChunkJob(k, m, buffer=self._pinned_buffer(writer) if self.cuda else None)
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
                            raise contract_error(
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


def collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": torch.stack([sample_image(it, i) for i, it in enumerate(items)]),
        "image_id": [str(it["image_id"]) for it in items],
    }
    if all(it.get("keypoints") is not None for it in items):
        out["keypoints"] = torch.stack([torch.as_tensor(it["keypoints"], dtype=torch.float32) for it in items])
    return out



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
