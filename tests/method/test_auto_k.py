"""decompose_head(..., auto_k=True): k is a cap; two prototypes whose maps are duplicates become one.

Duplicates are merged (summed). Properties: the head stays exact and the logits the original's; unused slots are
zero (alpha, initial and residual too); each slot is the sum of a group of the fixed-k prototypes; the threshold's
two ends give no change and k = 1; the redundancy diagnostic is the evaluation's redundancy on the training maps.
"""

from __future__ import annotations

import pytest
import torch

from phpn_core import PartPrototypeHead, decompose_head
from phpn_core.evaluation.keypoint_free import map_redundancy


def _class(n=12, hw=6, D=48, parts=2, seed=0):
    """Non-negative features of ``parts`` planted parts: each position shows at most one part, plus noise."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(parts, D, generator=g) * (torch.rand(parts, D, generator=g) < 0.4)
    which = torch.randint(0, parts + 2, (n * hw * hw,), generator=g)  # parts + 2: background twice as common
    E = torch.zeros(n * hw * hw, parts)
    on = which < parts
    E[on, which[on]] = 0.5 + torch.rand(int(on.sum()), generator=g)
    return (E @ P + 0.02 * torch.rand(n * hw * hw, D, generator=g)).reshape(n, hw, hw, D)


@pytest.fixture(scope="module")
def head_data():
    feats = {c: _class(parts=2 + c % 2, seed=c) for c in range(4)}
    W = torch.randn(4, 48, generator=torch.Generator().manual_seed(7))
    return feats, W


def test_exact_head_zero_slots_and_each_slot_is_a_sum_of_fixed_k_prototypes(head_data):
    feats, W = head_data
    before = {c: f.clone() for c, f in feats.items()}
    hd = decompose_head(feats, W, 5, seed=0, auto_k=True)
    fixed = decompose_head(feats, W, 5, seed=0)
    assert all(torch.equal(feats[c], before[c]) for c in feats)
    ks = hd.diagnostics["k"].long()
    assert bool((ks >= 1).all()) and bool((ks <= 5).all()) and bool((ks < 5).any())
    assert (hd.prototypes.sum(1) - W).abs().max() < 1e-5
    assert (hd.residual.sum(1) - (W - torch.bmm(hd.alpha.unsqueeze(1), hd.initial).squeeze(1))).abs().max() < 1e-4
    for i, c in enumerate(hd.classes):
        kc = int(ks[i])
        for t in (hd.prototypes, hd.initial, hd.residual):
            assert bool((t[i, kc:] == 0).all())
        assert bool((hd.alpha[i, kc:] == 0).all()) and bool((hd.alpha[i, :kc] != 0).all())
        assert bool((hd.initial[i] >= 0).all())
        # no duplicate pair is left (or one prototype is)
        assert kc == 1 or float(hd.diagnostics["redundancy"][i]) <= 0.9
        # each slot in use is the sum of a group of the fixed-k prototypes, every one of them in one group
        A = fixed.prototypes[i].double().T  # [D, 5]
        coef = torch.linalg.lstsq(A, hd.prototypes[i, :kc].double().T).solution  # [5, kc]
        assert torch.allclose(coef, coef.round(), atol=1e-4)
        assert torch.equal(coef.round().sum(1), torch.ones(5, dtype=coef.dtype))
        assert bool(((coef.round() == 0) | (coef.round() == 1)).all())
    # the fixed-k decomposition of these classes has duplicates: the merge is what removed them
    assert float(fixed.diagnostics["redundancy"].max()) > 0.9
    head = PartPrototypeHead.from_decomposition(hd, torch.zeros(4))
    assert head.k_per_class.tolist() == ks.tolist()
    fmap = torch.stack([feats[c][0] for c in range(4)]).permute(0, 3, 1, 2)
    assert torch.allclose(head(fmap), fmap.mean((2, 3)) @ W.T, atol=1e-5)


def test_threshold_ends(head_data):
    feats, W = head_data
    fixed = decompose_head(feats, W, 4, seed=0)
    same = decompose_head(feats, W, 4, seed=0, auto_k=True, auto_k_threshold=1.0)  # a cosine never exceeds 1
    assert torch.equal(fixed.prototypes, same.prototypes) and torch.equal(fixed.alpha, same.alpha)
    one = decompose_head(feats, W, 4, seed=0, auto_k=True, auto_k_threshold=-1.0)  # every pair is a duplicate
    assert one.diagnostics["k"].tolist() == [1.0] * 4
    assert torch.allclose(one.prototypes[:, 0], W, atol=1e-5) and bool((one.prototypes[:, 1:] == 0).all())
    assert one.diagnostics["redundancy"].tolist() == [-1.0] * 4
    assert torch.allclose(one.initial[:, 0], fixed.initial.sum(1))


def test_redundancy_diagnostic_is_the_evaluations_redundancy_on_the_training_maps(head_data):
    feats, W = head_data
    hd = decompose_head(feats, W, 3, seed=0)
    for i, c in enumerate(hd.classes):
        maps = torch.einsum("nhwd,kd->nkhw", feats[c].double(), hd.prototypes[i].double())
        maps = maps * torch.sign(hd.alpha[i]).double().view(1, -1, 1, 1)
        cos = map_redundancy(maps)
        expected = float((cos - 2 * torch.eye(3, dtype=cos.dtype)).max())
        assert float(hd.diagnostics["redundancy"][i]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.filterwarnings("ignore::phpn_core.method.factorization.NMFConvergenceWarning")
def test_streamed_and_batched_classes_agree(head_data):
    feats, W = head_data
    rhals = {"solver": "rhals"}  # a streamed class always uses it; small batched ones would take exact HALS
    batched = decompose_head(feats, W, 5, seed=0, auto_k=True, nmf_options=rhals)
    streamed = decompose_head(feats, W, 5, seed=0, auto_k=True, stream_bytes=1, nmf_options=rhals)  # all streamed
    assert torch.equal(batched.diagnostics["k"], streamed.diagnostics["k"])
    assert (streamed.prototypes.sum(1) - W).abs().max() < 1e-5
    assert torch.allclose(batched.rel_error, streamed.rel_error, rtol=5e-3)  # float reassociation, flat valley


def test_bad_auto_k_options():
    feats, W = {0: _class()}, torch.randn(1, 48)
    with pytest.raises(TypeError, match="auto_k must be a bool"):
        decompose_head(feats, W, 3, auto_k="yes")
    with pytest.raises(ValueError, match=r"auto_k_threshold must be a cosine in \[-1, 1\]; got 2"):
        decompose_head(feats, W, 3, auto_k=True, auto_k_threshold=2)


def test_sparse_nmf_keeps_the_head_and_logits_exact(head_data):
    # nmf_options={"sparsity": s} changes the initial prototypes (test_nmf: sparser coefficients), not exactness
    feats, W = head_data
    plain = decompose_head(feats, W, 4, seed=0)
    sparse = decompose_head(feats, W, 4, seed=0, nmf_options={"sparsity": 0.6})
    # float32 rounding of a sum of k prototypes: relative to their size
    assert float((sparse.prototypes.sum(1) - W).abs().max()) < 1e-6 * float(sparse.prototypes.abs().sum(1).max())
    head = PartPrototypeHead.from_decomposition(sparse, torch.zeros(4))
    fmap = torch.stack([feats[c][0] for c in range(4)]).permute(0, 3, 1, 2)
    assert torch.allclose(head.explain(fmap).contributions.sum(2), fmap.mean((2, 3)) @ W.T, atol=1e-4)
    assert not torch.allclose(sparse.initial, plain.initial)

