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

Modules: :mod:`~phpn_core.extract.features` (``extract_features``, the entry point), :mod:`~.schema`
(``build_schema``), :mod:`~.contract` (what extraction reads of a dataset, ``dataset_fingerprint``),
:mod:`~.pipeline` (one pass: loader, forward, hand-off), :mod:`~.writer` (the writer threads), :mod:`~.checks`.
"""

from phpn_core.extract.contract import dataset_fingerprint
from phpn_core.extract.features import ExtractionResult, extract_features
from phpn_core.extract.pipeline import ChunkWritten
from phpn_core.extract.schema import build_schema

__all__ = ["ChunkWritten", "ExtractionResult", "build_schema", "dataset_fingerprint", "extract_features"]
