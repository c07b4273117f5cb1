"""Classes streamed in row blocks (phpn_core.method.rows): the same solver as in memory, one block of memory.

Equality standard: a short run with a fixed number of sweeps is the in-memory result to float tolerance (the same
products, summed in another order). A full run's stopping point and extrapolation restarts are decided by float32
comparisons of errors, so a different summation order can take another, equally good path along NMF's flat valley:
there the test holds the error equal (1e-3 relative, as for a class in another batch) and the head exact.
"""

from __future__ import annotations

import pytest
import torch

from phpn_core import decompose_head
from phpn_core.method.nmf import nmf
from phpn_core.method.rows import RowSource, TensorRows
from phpn_core.method.stages import stage_clock


def _class(n=40, hw=7, D=256, r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.rand(n * hw * hw, r, generator=g) ** 3
    P = torch.rand(r, D, generator=g) * (torch.rand(r, D, generator=g) < 0.5)
    return (E @ P + 0.05 * torch.rand(n * hw * hw, D, generator=g)).reshape(n, hw, hw, D)


class CountingRows(RowSource):
    """A real row source over a tensor that records every block it hands out (rows per block, blocks per read)."""

    def __init__(self, F):
        self.inner = TensorRows(F)
        self.n_rows, self.dim, self.dtype = self.inner.n_rows, self.inner.dim, self.inner.dtype
        self.block_sizes: list[int] = []
        self.reads = 0

    def blocks(self, block_rows):
        self.reads += 1
        for s, b in self.inner.blocks(block_rows):
            self.block_sizes.append(b.shape[0])
            yield s, b


@pytest.mark.filterwarnings("ignore::phpn_core.method.factorization.NMFConvergenceWarning")
def test_streamed_nmf_is_the_in_memory_nmf_for_a_fixed_number_of_sweeps():
    X = _class().reshape(-1, 256)
    opts = dict(seed=3, max_iter=8, polish_iter=2, tol=0.0, solver="rhals")
    a = nmf(X, 4, **opts)
    b = nmf(TensorRows(X), 4, block_bytes=300 * 256 * 4, **opts)
    # float32 rounding of other sums, grown over 10 sweeps: ~1e-4 relative
    assert torch.allclose(a.P, b.P, rtol=2e-3, atol=2e-4 * float(a.P.abs().max()))
    assert torch.allclose(a.E, b.E, rtol=2e-3, atol=2e-4 * float(a.E.abs().max()))
    assert abs(float(a.rel_error) - float(b.rel_error)) < 1e-4 * float(a.rel_error), (a.rel_error, b.rel_error)


def test_decompose_head_streams_in_bounded_blocks_and_stays_exact():
    F = _class()
    W = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    F_before = F.clone()
    src = CountingRows(F)
    block_rows = 300
    with stage_clock() as clock:
        s = decompose_head({1: src}, W, 4, seed=0, nmf_options={"block_bytes": block_rows * 256 * 4})
    dense = decompose_head({1: F}, W, 4, seed=0)
    assert torch.equal(F, F_before)
    # memory: never more than block_rows rows of X at once
    assert max(src.block_sizes) <= block_rows and sum(src.block_sizes) == src.reads * F[..., 0].numel()
    # every read of X is one the solver counts: 1 scan + 1 + 2 x power_iters (2) range finder + 1 projection
    # + 2 per exact iteration (polish_iter = 14 at most) + 1 for the refinement's maps
    assert src.reads == sum(clock.reads.values()) <= 1 + 5 + 1 + 2 * 14 + 1
    assert (s.prototypes.sum(1) - W[1]).abs().max() < 1e-5
    assert abs(float(s.rel_error[0]) - float(dense.rel_error[0])) < 1e-3 * float(dense.rel_error[0])
    assert s.classes == [1] and s.prototypes.shape == (1, 4, 256)


def test_half_precision_rows_are_read_as_they_are_stored():
    F = _class(seed=2).half()
    W = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    src = CountingRows(F)
    seen = []
    inner = src.inner.blocks
    src.inner.blocks = lambda n: ((s, seen.append(b.dtype) or b) for s, b in inner(n))
    out = decompose_head({0: src}, W, 3, seed=0, nmf_options={"block_bytes": 500 * 256 * 4})
    assert set(seen) == {torch.float16}  # blocks leave the source in float16: no float32 copy of the class
    assert out.prototypes.dtype == torch.float32 and (out.prototypes.sum(1) - W[0]).abs().max() < 1e-5
    ref = decompose_head({0: F.float()}, W, 3, seed=0)
    assert abs(float(out.rel_error[0]) - float(ref.rel_error[0])) < 1e-3 * float(ref.rel_error[0])


def test_a_large_tensor_is_streamed_and_small_ones_batched_in_one_call():
    W = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    feats = {0: _class(seed=4), 2: _class(n=10, seed=5), 3: _class(n=12, seed=6)}
    big = feats[0].numel() * 4
    with stage_clock() as streamed:
        mixed = decompose_head(feats, W, 3, seed=0, stream_bytes=big - 1)  # class 0 streamed, 2 and 3 batched
    with stage_clock() as batched:
        alone = decompose_head(feats, W, 3, seed=0)
    # one read checks the batch; the streamed class adds its own scan (min, max, sums in one read)
    assert batched.reads["checks"] == 1 and streamed.reads["checks"] == 2
    assert mixed.classes == [0, 2, 3]
    assert (mixed.prototypes.sum(1) - W[[0, 2, 3]]).abs().max() < 1e-5
    assert torch.allclose(mixed.rel_error, alone.rel_error, rtol=1e-3)


@pytest.mark.parametrize("bad, match", [("nan", "finite"), ("negative", "non-negative")])
def test_bad_streamed_rows_are_refused_with_what_was_wrong(bad, match):
    F = _class(n=8)
    if bad == "nan":
        F[3, 2, 1, 7] = float("nan")
    else:
        F[0, 0, 0, 0] = -1.0
    W = torch.randn(1, 256)
    with pytest.raises(ValueError, match=match):
        decompose_head({0: TensorRows(F)}, W, 3, discovery="nmf")


def test_row_sources_need_nmf_discovery_and_the_heads_width():
    F = _class(n=8)
    with pytest.raises(ValueError, match="only discovery 'nmf' or 'auto'"):
        decompose_head({0: TensorRows(F)}, torch.randn(1, 256), 3, discovery="hybrid_nmf")
    with pytest.raises(ValueError, match="D=256"):
        decompose_head({0: TensorRows(F)}, torch.randn(1, 128), 3)
