"""Signed feature maps (LayerNormed ConvNeXt/Swin/ViT): semi-NMF and shifted NMF discovery, exactness, "where"."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phpn_core import PartPrototypeHead, decompose_class, decompose_head
from phpn_core.method.decompose import DISCOVERY_CODES
from phpn_core.method.nmf import NMFConvergenceWarning
from phpn_core.method.semi_nmf import semi_nmf

warnings.filterwarnings("ignore", category=NMFConvergenceWarning)
SIGNED = ["auto", "hybrid_nmf", "posneg_nmf", "semi_nmf", "shift_nmf"]


def _layernorm(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)


def _parts_scene(n: int, hw: int, D: int, n_parts: int, seed: int):
    """Signed token maps [n, hw, hw, D]: LayerNormed noise, each part vector planted at one random cell per image.

    Returns the maps and the planted cells ``[n, n_parts, 2]`` (row, col)."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.randn(n_parts, D, generator=g) * 3
    F = torch.randn(n, hw, hw, D, generator=g)
    cells = torch.zeros(n, n_parts, 2, dtype=torch.long)
    for i in range(n):
        perm = torch.randperm(hw * hw, generator=g)[:n_parts]
        for j, cell in enumerate(perm.tolist()):
            r, c = divmod(cell, hw)
            F[i, r, c] += parts[j]
            cells[i, j] = torch.tensor([r, c])
    return _layernorm(F), cells


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 4), hw=st.integers(2, 4), D=st.integers(8, 24), k=st.integers(1, 4),
       seed=st.integers(0, 10_000), discovery=st.sampled_from(SIGNED))
def test_signed_features_give_exact_logits_for_every_input(n, hw, D, k, seed, discovery):
    g = torch.Generator().manual_seed(seed)
    feats = {c: _layernorm(torch.randn(n, hw, hw, D, generator=g)) for c in range(3)}
    W, b = torch.randn(3, D, generator=g), torch.randn(3, generator=g)
    before = {c: f.clone() for c, f in feats.items()}
    hd = decompose_head(feats, W, k, seed=seed, discovery=discovery)
    assert all(torch.equal(feats[c], before[c]) for c in feats), "inputs mutated"
    assert float((hd.prototypes.sum(1) - W).abs().max()) <= 1e-5 * float(W.abs().max())
    head = PartPrototypeHead.from_decomposition(hd, b)
    # far outside the training range: 20x larger, shifted, any sign
    x = torch.randn(4, D, hw + 1, hw + 2, generator=g) * 20 - 7
    ref = x.mean((2, 3)) @ W.T + b
    got = head(x)
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    ex = head.explain(x)
    assert torch.allclose(ex.contributions.sum(-1) + b, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("discovery, recorded", [("auto", "hybrid_nmf"), ("hybrid_nmf", "hybrid_nmf"),
                                                  ("posneg_nmf", "posneg_nmf"), ("semi_nmf", "semi_nmf")])
def test_signed_discovery_is_recorded_and_its_prototypes_are_signed(discovery, recorded):
    F, _ = _parts_scene(6, 5, 24, 3, seed=1)
    cd = decompose_class(F, torch.randn(24), 3, discovery=discovery)
    assert cd.diagnostics["discovery"] == DISCOVERY_CODES[recorded]
    assert bool((cd.initial < 0).any()), "prototypes discovered on signed features are signed"


def test_auto_uses_nmf_for_nonnegative_classes_and_is_shard_independent():
    F, _ = _parts_scene(4, 4, 16, 2, seed=2)
    W = torch.randn(3, 16)
    signed, relu = F, F.clamp_min(0)
    together = decompose_head({0: signed, 1: relu, 2: signed}, W, 2)
    code = float(DISCOVERY_CODES["hybrid_nmf"])
    assert together.diagnostics["discovery"].tolist() == [code, 0.0, code]
    alone = decompose_head({1: relu}, W, 2)
    assert torch.equal(together.prototypes[1], alone.prototypes[0])
    alone2 = decompose_head({2: signed}, W, 2)
    assert torch.equal(together.prototypes[2], alone2.prototypes[0])


def test_plain_nmf_refuses_signed_features_and_says_what_to_use():
    F, _ = _parts_scene(3, 3, 8, 2, seed=3)
    with pytest.raises(ValueError, match="discovery='auto'"):
        decompose_class(F, torch.randn(8), 2, discovery="nmf")
    with pytest.raises(ValueError, match="discovery must be one of"):
        decompose_class(F, torch.randn(8), 2, discovery="pca")


@pytest.mark.parametrize("discovery", SIGNED)
def test_oriented_heatmaps_peak_on_the_planted_parts(discovery):
    """'Where' on signed maps: every planted part has a prototype whose oriented map peaks on it in most images.

    (Before shift_nmf refined on class-centred maps, it lost one of the three parts here: the shift's constant
    swamped the refinement's normalised comparison of maps.)"""
    n, hw, D, P = 16, 6, 32, 3
    F, cells = _parts_scene(n, hw, D, P, seed=4)
    v = torch.randn(D, generator=torch.Generator().manual_seed(5))
    cd = decompose_class(F, v, P + 1, discovery=discovery)  # + 1 for the background
    head = PartPrototypeHead(cd.prototypes[None], torch.zeros(1), signs=torch.sign(cd.alpha)[None])
    maps = head.explain(F.permute(0, 3, 1, 2)).oriented_heatmaps[:, 0]  # [n, k, hw, hw]
    peaks = maps.flatten(2).argmax(-1)  # [n, k]
    planted = cells[:, :, 0] * hw + cells[:, :, 1]  # [n, P]
    hit = (peaks.unsqueeze(2) == planted.unsqueeze(1)).float().mean(0)  # [k, P]
    assert bool((hit.amax(0) >= 0.8).all()), f"{discovery}: best hit rate per part {hit.amax(0).tolist()}"


@pytest.mark.parametrize("discovery", ["hybrid_nmf", "posneg_nmf"])
def test_centring_discoveries_ignore_a_per_channel_offset(discovery):
    """hybrid_nmf and posneg_nmf see each channel relative to its own floor or mean: adding a constant per channel
    to every position (what a LayerNorm's beta or a bias does) changes no prototype."""
    F, _ = _parts_scene(6, 4, 16, 2, seed=6)
    F = F.double()  # in float32 the offset's rounding moves NMF's iterates by ~1e-3 relative
    v = torch.randn(16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    offset = torch.randn(16, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 5
    one = decompose_class(F, v, 3, discovery=discovery)
    moved = decompose_class(F + offset, v, 3, discovery=discovery)
    assert torch.allclose(one.prototypes, moved.prototypes, atol=1e-8 * float(one.prototypes.abs().max()))


def test_hybrid_nmf_shifts_floored_channels_and_splits_two_sided_ones():
    """A channel with a floor (an activation: values at most ~1 sd below the mean) has no deficit part; a
    two-sided channel has both. The floored half of F is post-GELU-like, the other half LayerNormed noise."""
    g = torch.Generator().manual_seed(9)
    n, hw, D = 8, 5, 16
    floored = torch.nn.functional.gelu(torch.randn(n, hw, hw, D // 2, generator=g) * 2)
    two_sided = torch.randn(n, hw, hw, D // 2, generator=g)
    F = torch.cat([floored, two_sided], -1)
    from phpn_core.method.decompose import _hybrid_discover

    X = F.reshape(1, -1, D)
    valid = torch.ones(1, X.shape[1], dtype=torch.bool)
    res, Xc = _hybrid_discover(X, valid, 3, None, [0], {}, "cpu")
    assert torch.allclose(Xc[0], X[0] - X[0].mean(0), atol=1e-5)
    # each prototype maps back as (p+ - p-) / sd: where p- is zero (the floored channels) the prototype is >= 0
    assert bool((res.P[0, :, : D // 2] >= 0).all()), "a floored channel's prototype entries have no deficit part"
    assert bool((res.P[0, :, D // 2 :] < 0).any()), "two-sided channels keep their deficit parts"


def test_semi_nmf_recovers_centroids_and_keeps_e_nonnegative():
    g = torch.Generator().manual_seed(0)
    cents = torch.randn(3, 20, generator=g)
    X = cents[torch.arange(60) % 3] * (1 + 0.5 * torch.rand(60, 1, generator=g))  # scaled copies, signed
    X0 = X.clone()
    res = semi_nmf(X, 3, seed=0)
    assert torch.equal(X, X0)
    assert bool((res.E >= 0).all())
    assert float(res.rel_error) < 1e-3
    cos = torch.nn.functional.normalize(res.P, dim=1) @ torch.nn.functional.normalize(cents, dim=1).T
    # semi-NMF is unique only up to a non-negative mixing; the prototypes stay near distinct centroids
    assert sorted(cos.argmax(1).tolist()) == [0, 1, 2] and float(cos.amax(1).min()) > 0.95


def test_semi_nmf_is_deterministic_and_padding_invariant():
    g = torch.Generator().manual_seed(1)
    cents = torch.randn(4, 12, generator=g)  # clustered rows: the solver converges, so rounding cannot grow
    A = cents[torch.arange(40) % 4] + 0.1 * torch.randn(40, 12, generator=g)
    B = cents[torch.arange(25) % 3] + 0.1 * torch.randn(25, 12, generator=g)
    one = semi_nmf(A, 3, seed=7)
    again = semi_nmf(A, 3, seed=7)
    assert torch.equal(one.P, again.P) and torch.equal(one.E, again.E)
    X = torch.zeros(2, 40, 12)
    X[0], X[1, :25] = A, B
    both = semi_nmf(X, 3, row_counts=torch.tensor([40, 25]), item_seeds=[7, 9])
    assert torch.allclose(both.P[0], one.P, atol=1e-5)
    assert float(both.E[1, 25:].abs().max()) == 0.0
    solo = semi_nmf(B, 3, seed=9)
    assert torch.allclose(both.P[1], solo.P, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (torch.full((5, 4), float("nan")), "NaN"),
    (torch.randn(5, 4, 3, 2), "shape"),
    (torch.randn(3, 4), r"k must be in \[1, min\(m, D\)\]"),
])
def test_semi_nmf_bad_input_says_what_was_expected(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        semi_nmf(bad, 4)
