"""decompose_class / decompose_head: the exactness properties, determinism, bad input."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phpn_core import decompose_class, decompose_head
from phpn_core.data.planted import planted_features
from phpn_core.method.nmf import NMFConvergenceWarning

warnings.filterwarnings("ignore", category=NMFConvergenceWarning)


def _class_features(n, hw, D, seed, dtype=torch.float32):
    feats, _, _ = planted_features(n_classes=1, n_images=n, hw=hw, dim=D, parts_per_class=3, seed=seed)
    return feats[0].to(dtype)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 6), hw=st.integers(2, 5), D=st.integers(8, 48), k=st.integers(1, 5),
       seed=st.integers(0, 10_000), normalization=st.sampled_from(["l2", "none"]),
       target=st.sampled_from(["residual", "prototype"]))
def test_prototypes_sum_exactly_to_head_row(n, hw, D, k, seed, normalization, target):
    F = _class_features(n, hw, D, seed)
    v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    F0, v0 = F.clone(), v.clone()
    cd = decompose_class(F, v, k, seed=seed, normalization=normalization, target=target)
    assert torch.equal(F, F0) and torch.equal(v, v0), "inputs mutated"
    assert cd.prototypes.shape == (k, D) and cd.initial.shape == (k, D)
    assert cd.alpha.shape == (k,) and cd.residual.shape == (k, D)
    assert float((cd.prototypes.sum(0) - v).abs().max()) <= 1e-5 * float(v.abs().max())
    assert bool((cd.initial >= 0).all())
    # residual parts sum to the least-squares residual
    R = v - cd.alpha @ cd.initial
    assert float((cd.residual.sum(0) - R).abs().max()) <= 1e-4 * float(v.abs().max())
    assert torch.allclose(cd.prototypes, cd.alpha[:, None] * cd.initial + cd.residual, atol=1e-5)


def test_same_seed_same_result():
    F = _class_features(4, 4, 32, 1)
    v = torch.randn(32)
    a, b = decompose_class(F, v, 4, seed=3), decompose_class(F, v, 4, seed=3)
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.alpha, b.alpha)


def test_float64_agrees_with_float32():
    F = _class_features(5, 4, 32, 2)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    a = decompose_class(F, v, 3)
    b = decompose_class(F.double(), v.double(), 3)
    assert float((b.prototypes.sum(0) - v.double()).abs().max()) <= 1e-12 * float(v.abs().max())
    # float32 and float64 stop at different sweeps (the tolerance is near float32's resolution), so compare
    # what matters: the same reconstruction quality and the same prototype directions.
    assert abs(a.rel_error - b.rel_error) <= 1e-3 * b.rel_error + 1e-5
    cos = torch.nn.functional.cosine_similarity(a.initial.double(), b.initial, dim=1)
    assert float(cos.min()) > 0.99


def test_refinement_improves_paper_objective():
    feats, _, _ = planted_features(n_classes=3, n_images=8, hw=5, dim=40, seed=3)
    W = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    hd = decompose_head(feats, W, 4)
    d = hd.diagnostics
    assert bool((d["refine_objective"] <= d["refine_objective_start"] + 1e-9).all())
    assert bool((d["refine_objective"] < d["refine_objective_start"]).any())


def test_head_batch_matches_single_class_and_shards():
    feats, _, _ = planted_features(n_classes=4, n_images=6, hw=4, dim=32, seed=5)
    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    full = decompose_head(feats, W, 3, seed=1)
    shard = decompose_head({2: feats[2], 3: feats[3]}, W, 3, seed=1)
    assert full.prototypes.shape == (4, 3, 32) and shard.classes == [2, 3]
    assert torch.allclose(full.rel_error[2:], shard.rel_error, rtol=1e-3)
    assert torch.allclose(shard.prototypes.sum(1), W[2:], atol=1e-5 * float(W.abs().max()))
    assert float((full.prototypes.sum(1) - W).abs().max()) <= 1e-5 * float(W.abs().max())


def test_classes_with_different_image_counts():
    feats, _, _ = planted_features(n_classes=3, n_images=6, hw=4, dim=24, seed=6)
    feats[1] = feats[1][:3]
    W = torch.randn(3, 24)
    hd = decompose_head(feats, W, 3)
    assert float((hd.prototypes.sum(1) - W).abs().max()) <= 1e-5 * float(W.abs().max())
    alone = decompose_head({1: feats[1]}, W, 3)
    assert abs(float(hd.rel_error[1]) - float(alone.rel_error[0])) <= 1e-3 * float(alone.rel_error[0])


def _F():
    return torch.rand(3, 2, 2, 8)


@pytest.mark.parametrize(
    "F, v, k, err, match",
    [
        (_F().index_fill(0, torch.tensor([0]), float("nan")), torch.randn(8), 2, ValueError, "NaN or inf"),
        (_F(), torch.randn(7), 2, ValueError, "does not match the head's D=7"),
        (_F().reshape(12, 8), torch.randn(8), 2, ValueError, r"\[n, H, W, D\]"),
        (_F(), torch.randn(8), 0, ValueError, "k must be >= 1"),
        (_F(), torch.randn(8), 9, ValueError, "k=9 prototypes need"),
        (torch.rand(0, 2, 2, 8), torch.randn(8), 2, ValueError, "no features"),
        (_F(), torch.randn(8, dtype=torch.float64), 2, TypeError, "share dtype"),
        (_F(), torch.randn(8), 2.5, TypeError, "k must be an int"),
    ],
)
def test_bad_input(F, v, k, err, match):
    with pytest.raises(err, match=match):
        decompose_class(F, v, k)


def test_bad_head_input():
    W = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"ints in \[0, 3\)"):
        decompose_head({5: _F()}, W, 2)
    with pytest.raises(TypeError, match="one dtype and device"):
        decompose_head({0: _F(), 1: _F().double()}, W, 2)
    with pytest.raises(ValueError, match="non-empty mapping"):
        decompose_head({}, W, 2)
    with pytest.raises(ValueError, match="normalization must be one of"):
        decompose_head({0: _F()}, W, 2, normalization="l1")
