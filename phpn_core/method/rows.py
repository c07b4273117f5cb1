"""Where the solvers read the features from: a batch in memory, or one class's rows streamed in blocks.

Everything :func:`~phpn_core.method.nmf.nmf` and the refinement need from X ``[m, D]`` is a product with a thin
matrix (``X G``, ``A X``, ``P X^T``) and four sums (minimum, maximum, total, total of squares). Each is a sum over
row blocks, so a class too large to hold in float32 is read block by block: a :class:`RowSource` yields its rows
``[b, D]`` in whatever dtype they are stored in (float16 from a feature store), each block is cast to the compute
dtype on the compute device, used and dropped. Peak memory is then one block plus the thin factors
(``[m, k + oversample]``), not the class.

- :class:`DenseProducts`: a padded batch ``[B, m, D]`` in memory (``torch.bmm``).
- :class:`BlockProducts`: one matrix from a :class:`RowSource`; counts its passes and its largest block, so tests
  can check the memory bound without timing anything.
- :class:`TensorRows`: a tensor ``[m, D]`` of any float dtype as a source (no float32 copy of the whole).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator

import torch

from phpn_core.method.stages import count_read

__all__ = ["RowSource", "TensorRows", "DenseProducts", "BlockProducts", "DEFAULT_BLOCK_BYTES", "release_freed_memory"]

DEFAULT_BLOCK_BYTES = 32 << 20  # one compute-dtype block: large enough for full-speed GEMMs, small against 1 GB


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Streaming frees a block-sized buffer per block; glibc then raises its mmap threshold and serves the next ones
    from the heap, which it keeps: without this, a shard's resident memory grows by ~250 MB per streamed class."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _fix_mmap_threshold() -> None:
    """Serve buffers of 1 MB and more by mmap, always (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere):
    a freed block then goes back to the OS at once, in whichever thread's arena it was made."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


class RowSource:
    """The rows of one class's features, readable any number of times, in blocks.

    Subclasses set ``n_rows``, ``dim``, ``dtype`` (the stored dtype) and implement :meth:`blocks`; ``hw`` (positions
    per image, rows coming image by image) where known.
    """

    n_rows: int
    dim: int
    dtype: torch.dtype
    hw: int | None = None

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, rows [b, D])`` in order, ``b <= block_rows``, covering rows ``0..n_rows`` once."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.dim)


class TensorRows(RowSource):
    """A tensor ``[m, D]`` (or ``[n, H, W, D]``, flattened) as a row source; blocks are views, never copies."""

    def __init__(self, F: torch.Tensor, *, hw: int | None = None):
        if not isinstance(F, torch.Tensor) or F.ndim < 2 or not F.is_floating_point():
            raise TypeError(
                f"TensorRows: expected a float tensor [m, D] or [n, H, W, D]; got "
                f"{type(F).__name__ if not isinstance(F, torch.Tensor) else (F.dtype, tuple(F.shape))}.")
        # positions per image (rows come image by image): known from [n, H, W, D], else given
        self.hw = F.shape[1] * F.shape[2] if F.ndim == 4 else hw
        self.F = F.reshape(-1, F.shape[-1])
        self.n_rows, self.dim = self.F.shape
        self.dtype = F.dtype

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.n_rows, block_rows):
            yield s, self.F[s : s + block_rows]


class DenseProducts:
    """Products with a padded batch X ``[B, m, D]`` held in memory."""

    def __init__(self, X: torch.Tensor):
        self.X = X
        self.shape = tuple(X.shape)
        self.passes = 0

    def times(self, G: torch.Tensor) -> torch.Tensor:
        """``X @ G``: G ``[B, D, r]`` -> ``[B, m, r]``."""
        self.passes += 1
        count_read()
        return torch.bmm(self.X, G)

    def t_times(self, A: torch.Tensor) -> torch.Tensor:
        """``A @ X``: A ``[B, r, m]`` -> ``[B, r, D]``."""
        self.passes += 1
        count_read()
        return torch.bmm(A, self.X)

    def times_t(self, P: torch.Tensor) -> torch.Tensor:
        """``P @ X^T``: P ``[B, r, D]`` -> ``[B, r, m]``."""
        self.passes += 1
        count_read()
        return torch.bmm(P, self.X.transpose(1, 2))

    def sq_norm(self) -> torch.Tensor:
        """``||X_b||^2`` ``[B]``. A pairwise sum of the squares: ``vector_norm``'s float32 accumulation is 0.5% off
        for a class of 15,000 x 2048, which moves every relative error by as much."""
        self.passes += 1
        count_read()
        return (self.X * self.X).sum((1, 2))

    def total(self) -> torch.Tensor:
        self.passes += 1
        count_read()
        return self.X.sum((1, 2))


class BlockProducts:
    """The same products for one matrix (``B = 1``) read from a :class:`RowSource` block by block.

    Each product reads the source once (``passes`` counts them); ``max_block_rows`` is the largest block read.
    """

    def __init__(self, source: RowSource, *, device, dtype: torch.dtype, block_bytes: int = DEFAULT_BLOCK_BYTES):
        self.source = source
        self.device, self.dtype = torch.device(device), dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.block_rows = max(1, int(block_bytes) // max(1, source.dim * itemsize))
        self.shape = (1, source.n_rows, source.dim)
        self.passes = 0
        self.max_block_rows = 0
        _fix_mmap_threshold()

    def _blocks(self):
        self.passes += 1
        count_read()
        for s, b in self.source.blocks(self.block_rows):
            self.max_block_rows = max(self.max_block_rows, b.shape[0])
            yield s, b.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def times(self, G: torch.Tensor) -> torch.Tensor:
        g = G[0]
        out = torch.empty(self.source.n_rows, g.shape[1], dtype=self.dtype, device=self.device)
        for s, b in self._blocks():
            torch.mm(b, g, out=out[s : s + b.shape[0]])
        return out.unsqueeze(0)

    def t_times(self, A: torch.Tensor) -> torch.Tensor:
        a = A[0]
        out = torch.zeros(a.shape[0], self.source.dim, dtype=self.dtype, device=self.device)
        for s, b in self._blocks():
            out.addmm_(a[:, s : s + b.shape[0]], b)
        return out.unsqueeze(0)

    def times_t(self, P: torch.Tensor) -> torch.Tensor:
        return self.times(P.transpose(1, 2)).transpose(1, 2)

    def scan(self) -> dict:
        """One read: ``{"min", "max", "total", "sq_norm"}`` as 0-d tensors (a NaN shows in min and max)."""
        lo = hi = tot = sq = None
        for _, b in self._blocks():
            bl, bh = torch.aminmax(b)
            # pairwise float32 sums within a block (no float64 copy of it), float64 across blocks
            bt = b.sum().double()
            bs = (b * b).sum().double()
            lo = bl if lo is None else torch.minimum(lo, bl)
            hi = bh if hi is None else torch.maximum(hi, bh)
            tot = bt if tot is None else tot + bt
            sq = bs if sq is None else sq + bs
        return {"min": lo, "max": hi, "total": tot, "sq_norm": sq}
