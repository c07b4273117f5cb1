"""nmf: correctness against direct computation, determinism, padding, bad input."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phpn_core.data.planted import planted_features
from phpn_core.method.nmf import NMFConvergenceWarning, _relative_error, nmf


def _lowrank(B, m, D, r, seed, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    E = torch.rand(B, m, r, generator=g)
    P = torch.rand(B, r, D, generator=g) * (torch.rand(B, r, D, generator=g) < 0.4)
    return (E @ P + noise * torch.rand(B, m, D, generator=g)).clamp_min(0)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(4, 60), D=st.integers(4, 40), k=st.integers(1, 4), seed=st.integers(0, 10_000),
       solver=st.sampled_from(["hals", "rhals"]))
def test_factors_nonnegative_and_error_is_true_error(m, D, k, seed, solver):
    X = _lowrank(1, m, D, 3, seed)[0]
    X0 = X.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NMFConvergenceWarning)
        r = nmf(X, k, seed=seed, solver=solver, oversample=4)
    assert torch.equal(X, X0), "input mutated"
    assert r.E.shape == (m, k) and r.P.shape == (k, D)
    assert bool((r.E >= 0).all()) and bool((r.P >= 0).all())
    direct = _relative_error(X, r.E, r.P)
    assert abs(float(direct) - float(r.rel_error)) <= 1e-3 + 1e-3 * float(direct)


def test_recovers_exact_low_rank():
    X = _lowrank(2, 80, 50, 4, seed=1, noise=0.0)
    r = nmf(X, 4, max_iter=1000, tol=1e-9, polish_iter=500)
    assert float(r.rel_error.max()) < 1e-2


def test_same_seed_same_result_and_batch_independence():
    X = _lowrank(3, 120, 64, 5, seed=2)
    a, b = nmf(X, 5, seed=7), nmf(X, 5, seed=7)
    assert torch.equal(a.P, b.P) and torch.equal(a.E, b.E)
    # An item's result depends on its own data and seed, not on its batch-mates, up to the float
    # reassociation of another batch size (which can move the stopping point along a flat valley).
    single = nmf(X[1:2], 5, item_seeds=[8])
    assert abs(float(single.rel_error[0]) - float(a.rel_error[1])) < 1e-3 * float(a.rel_error[1]) + 1e-4


@pytest.mark.filterwarnings("ignore::phpn_core.method.factorization.NMFConvergenceWarning")
@pytest.mark.parametrize("solver", ["rhals", "hals"])
def test_random_start_is_seeded_per_matrix_and_reaches_the_same_fit(solver):
    X = _lowrank(3, 120, 64, 5, seed=2)
    before = X.clone()
    a, b = nmf(X, 5, seed=7, init="random", solver=solver), nmf(X, 5, seed=7, init="random", solver=solver)
    assert torch.equal(X, before)
    assert torch.equal(a.P, b.P) and torch.equal(a.E, b.E)
    assert bool((a.E >= 0).all()) and bool((a.P >= 0).all())
    other = nmf(X, 5, seed=8, init="random", solver=solver)
    assert not torch.equal(other.P, a.P)  # another seed: another start
    single = nmf(X[1:2], 5, item_seeds=[8], init="random", solver=solver)  # not its batch-mates'
    assert abs(float(single.rel_error[0]) - float(a.rel_error[1])) < 1e-3 * float(a.rel_error[1]) + 1e-4
    nnd = nmf(X, 5, seed=7, solver=solver)
    assert torch.allclose(a.rel_error, _relative_error(X, a.E, a.P), rtol=1e-3)
    assert float((a.rel_error - nnd.rel_error).abs().max()) < 0.02  # a different start, a fit as good
    with pytest.raises(ValueError, match="init must be one of"):
        nmf(X, 5, init="nndsvd")


def test_padding_rows_are_exact():
    X = _lowrank(2, 90, 40, 3, seed=3)
    Xp = X.clone()
    Xp[1, 60:] = 0
    r = nmf(Xp, 3, row_counts=torch.tensor([90, 60]), item_seeds=[0, 1], solver="hals")
    alone = nmf(Xp[1, :60], 3, item_seeds=[1], solver="hals")
    assert bool((r.E[1, 60:] == 0).all())
    # Same problem, same seed: the same factorisation up to where float reassociation moves the stopping point.
    assert abs(float(r.rel_error[1]) - float(alone.rel_error)) <= 1e-3 * float(alone.rel_error)
    assert torch.allclose(r.P[1], alone.P, atol=1e-3, rtol=2e-2)


def test_no_worse_than_sklearn_on_planted_parts():
    from sklearn.decomposition import NMF

    feats, _, _ = planted_features(n_classes=2, n_images=10, dim=96, noise=0.5, seed=4)
    X = torch.stack([f.reshape(-1, 96) for f in feats.values()])
    ours = nmf(X, 6, seed=0)
    for i in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = NMF(6, init="nndsvda", max_iter=500, random_state=0).fit(X[i].numpy())
        sk_rel = sk.reconstruction_err_ / np.linalg.norm(X[i].numpy())
        assert float(ours.rel_error[i]) <= sk_rel * 1.01


def test_float64_agrees_with_float32():
    X = _lowrank(1, 100, 30, 3, seed=5)[0]
    a, b = nmf(X, 3, solver="hals"), nmf(X.double(), 3, solver="hals")
    assert abs(float(a.rel_error) - float(b.rel_error)) < 1e-3


def test_unconverged_warns():
    X = _lowrank(1, 100, 30, 5, seed=6)[0]
    with pytest.warns(NMFConvergenceWarning, match="iteration limit"):
        nmf(X, 5, max_iter=2, polish_iter=1, tol=0.0)


@pytest.mark.parametrize(
    "X, k, err, match",
    [
        (-torch.ones(5, 4), 2, ValueError, "non-negative"),
        (torch.full((5, 4), float("nan")), 2, ValueError, "finite"),
        (torch.full((5, 4), float("inf")), 2, ValueError, "finite"),
        (torch.ones(5, 4), 0, ValueError, r"k must be in \[1, min\(m, D\)\]"),
        (torch.ones(5, 4), 5, ValueError, "got k=5"),
        (torch.ones(5), 1, ValueError, r"\[m, D\] or \[B, m, D\]"),
        (torch.ones(0, 4), 1, ValueError, "empty"),
        (torch.ones(5, 4, dtype=torch.long), 1, TypeError, "float32 or float64"),
        (np.ones((5, 4)), 1, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(X, k, err, match):
    with pytest.raises(err, match=match):
        nmf(X, k)


def _penalised(X, E, P, s):
    """The objective ``nmf(..., sparsity=s)`` minimises, computed directly."""
    l1 = (P.norm(dim=-1) * E.sum(-2)).sum(-1)  # sum_j ||P_j||_2 ||E_j||_1
    return ((X - E @ P) ** 2).sum((-2, -1)) + 2 * s * X.mean((-2, -1)) * l1


@pytest.mark.filterwarnings("ignore::phpn_core.method.factorization.NMFConvergenceWarning")
@pytest.mark.parametrize("solver", ["rhals", "hals"])
def test_sparsity_penalises_coefficients_and_reports_the_true_error(solver):
    X = _lowrank(3, 200, 48, 4, seed=5, noise=0.1).double()
    before = X.clone()
    plain = nmf(X, 6, seed=1, solver=solver)
    assert torch.equal(nmf(X, 6, seed=1, solver=solver, sparsity=0.0).P, plain.P)  # 0 is plain NMF, bit for bit
    sparse = nmf(X, 6, seed=1, solver=solver, sparsity=0.1)
    assert torch.equal(X, before)
    assert bool((sparse.E >= 0).all()) and bool((sparse.P >= 0).all())
    # the reported error is the reconstruction's, not the objective's
    assert torch.allclose(sparse.rel_error, _relative_error(X, sparse.E, sparse.P), rtol=1e-6)

    def density(r):
        return float((r.E > 1e-6 * r.E.amax()).double().mean())

    assert density(sparse) < 0.95 * density(plain)
    # it minimises its own objective better than plain NMF's optimum does, at a small cost in reconstruction
    assert bool((_penalised(X, sparse.E, sparse.P, 0.1) < _penalised(X, plain.E, plain.P, 0.1)).all())
    assert float((sparse.rel_error - plain.rel_error).max()) < 0.05
    # invariant to X's scale: 3 X gets as sparse a fit, as close (up to where the iterations stop)
    scaled = nmf(3 * X, 6, seed=1, solver=solver, sparsity=0.1)
    assert torch.allclose(scaled.rel_error, sparse.rel_error, rtol=3e-2)
    assert abs(density(scaled) - density(sparse)) < 0.02


@pytest.mark.filterwarnings("ignore::phpn_core.method.factorization.NMFConvergenceWarning")
def test_sparsity_streamed_matches_dense_and_bad_values_are_refused():
    from phpn_core.method.rows import TensorRows

    X = _lowrank(1, 300, 40, 4, seed=6)[0].double()
    dense = nmf(X, 5, seed=2, solver="rhals", sparsity=0.05)
    streamed = nmf(TensorRows(X), 5, seed=2, sparsity=0.05, block_bytes=64 * 40 * 8)
    assert abs(float(dense.rel_error) - float(streamed.rel_error)) < 1e-6
    assert torch.allclose(dense.P, streamed.P, rtol=1e-5, atol=1e-8)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="sparsity must be a finite number >= 0"):
            nmf(X, 5, sparsity=bad)
