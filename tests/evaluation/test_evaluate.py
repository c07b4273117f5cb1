"""Evaluation: accuracy parity, ProtoEval (consistency, stability), faithfulness axioms, baselines.

Hand-built cases with known answers first, then the pipeline on a small SynthParts problem.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.evaluation import (
    accuracy_parity, box_half_size_px, channel_attributions, completeness_error, consistency,
    head_reconstruction_error, linearity_check, part_coverage, peak_locations, protoeval, sensitivity_check,
    stability, symmetry_check,
)
from phpn_core.method.head import Explanation, PartPrototypeHead

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _delta_maps(peaks, size):
    """``[N, k, S, S]`` maps that are 0 except a 1 at each (row, col) in ``peaks`` ``[N][k]``."""
    N, k = len(peaks), len(peaks[0])
    maps = torch.zeros(N, k, size, size)
    for n in range(N):
        for i in range(k):
            r, c = peaks[n][i]
            maps[n, i, r, c] = 1.0
    return maps


# ============================================================================================ box geometry

def test_box_half_size_scales_with_the_image():
    assert box_half_size_px(224) == (36, 36)
    assert box_half_size_px(112) == (18, 18)
    assert box_half_size_px((112, 224)) == (18, 36)
    assert box_half_size_px(448) == (72, 72)
    assert box_half_size_px(100, box_half_size=36, box_reference_size=None) == (36, 36)
    with pytest.raises(InputValueError, match="box_half_size"):
        box_half_size_px(224, box_half_size=-1)


def test_box_clipped_at_the_image_corner():
    S = 224
    maps = _delta_maps([[(0, 0)], [(223, 223)]], S)
    kp = torch.tensor([
        # peak at the top-left corner: box [0, 36] x [0, 36]
        [[36.0, 36.0, 1], [37.0, 0.0, 1], [-1.0, 0.0, 1], [0.0, 36.5, 1]],
        # peak at the bottom-right corner: box [187, 224] x [187, 224]
        [[223.9, 223.9, 1], [187.0, 187.0, 1], [186.9, 200.0, 1], [224.5, 200.0, 1]],
    ])
    cov = part_coverage(maps, kp, image_size=S)
    assert cov.shape == (2, 1, 4)
    assert cov[0, 0].tolist() == [True, False, False, False]
    assert cov[1, 0].tolist() == [True, True, False, False]


def test_box_half_size_at_112_px_is_18():
    maps = _delta_maps([[(50, 50)]], 112)
    kp = torch.tensor([[[68.0, 50.0, 1], [68.5, 50.0, 1], [32.0, 32.0, 1], [31.5, 50.0, 1]]])
    assert part_coverage(maps, kp, image_size=112)[0, 0].tolist() == [True, False, True, False]
    # the same offsets at 224 px are inside the 36 px box
    maps = _delta_maps([[(50, 50)]], 224)
    assert part_coverage(maps, kp, image_size=224)[0, 0].tolist() == [True, True, True, True]


def test_low_resolution_maps_are_upsampled_before_the_argmax():
    maps = torch.zeros(1, 1, 7, 7)
    maps[0, 0, 6, 1] = 5.0  # cell (6, 1) of a 7x7 grid on 224 px: centre near pixel (208, 48)
    peak = peak_locations(maps, image_size=224)[0, 0].tolist()
    assert abs(peak[0] - 207.5) <= 1 and abs(peak[1] - 47.5) <= 1
    near = peak_locations(maps, image_size=224, upsample="nearest")[0, 0].tolist()
    assert near == [192, 32]  # nearest: the first pixel of the cell
    kp = torch.tensor([[[48.0, 208.0, 1], [48.0, 140.0, 1]]])
    for mode in ("bilinear", "bicubic", "nearest"):
        assert part_coverage(maps, kp, image_size=224, upsample=mode)[0, 0].tolist() == [True, False]


@FAST
@given(S=st.integers(48, 160), data=st.data())
def test_coverage_is_keypoint_within_half_size_of_the_peak(S, data):
    N, k, P = 3, 2, 4
    peaks = [[(data.draw(st.integers(0, S - 1)), data.draw(st.integers(0, S - 1))) for _ in range(k)] for _ in range(N)]
    coords = st.floats(-5, S + 5, allow_nan=False, width=32)
    kp = torch.tensor([[[data.draw(coords), data.draw(coords), float(data.draw(st.booleans()))] for _ in range(P)]
                       for _ in range(N)])
    cov = part_coverage(_delta_maps(peaks, S), kp, image_size=S)
    h = box_half_size_px(S)[0]
    for n in range(N):
        for i in range(k):
            r, c = peaks[n][i]
            for p in range(P):
                x, y, v = kp[n, p].tolist()
                expect = bool(v) and abs(x - c) <= h and abs(y - r) <= h and 0 <= x <= S and 0 <= y <= S
                assert bool(cov[n, i, p]) == expect


def test_part_coverage_input_errors():
    with pytest.raises(ShapeError, match=r"\[N, k, h, w\]"):
        part_coverage(torch.zeros(2, 7, 7), torch.zeros(2, 3, 3), image_size=224)
    with pytest.raises(ShapeError, match="keypoints"):
        part_coverage(torch.zeros(2, 1, 7, 7), torch.zeros(3, 3, 3), image_size=224)
    with pytest.raises(InputValueError, match="upsample"):
        part_coverage(torch.zeros(2, 1, 7, 7), torch.zeros(2, 3, 3), image_size=224, upsample="area")
    with pytest.raises(InputValueError, match="NaN"):
        part_coverage(torch.full((1, 1, 7, 7), float("nan")), torch.zeros(1, 3, 3), image_size=224)


# ============================================================================================ consistency, stability

def _two_prototype_case(N=20, S=224, seed=0, part2_invisible=()):
    """Prototype 0 peaks on part 2's keypoint on every image; prototype 1 at random positions."""
    g = torch.Generator().manual_seed(seed)
    kp = torch.zeros(N, 4, 3)
    kp[:, :3, :2] = torch.rand(N, 3, 2, generator=g) * (S - 1)
    kp[:, :3, 2] = 1
    kp[:, 3] = torch.tensor([100.0, 100.0, 0.0])  # part 3 is never visible
    for n in part2_invisible:
        kp[n, 2, 2] = 0
    rand = torch.randint(0, S, (N, 2), generator=g)
    peaks = [[(int(kp[n, 2, 1]), int(kp[n, 2, 0])), (int(rand[n, 0]), int(rand[n, 1]))] for n in range(N)]
    return _delta_maps(peaks, S), kp


def test_prototype_on_one_part_is_consistent_random_one_is_not():
    maps, kp = _two_prototype_case()
    cov = part_coverage(maps, kp, image_size=224)
    res = consistency(cov, kp[..., 2] > 0.5)
    assert res.per_prototype.tolist() == [True, False]
    assert res.score == 50.0
    assert res.per_prototype_part_rate.shape == (2, 4)
    assert res.per_prototype_part_rate[0, 2] == 1.0
    assert int(res.best_part[0]) == 2
    assert float(res.per_prototype_part_rate[1].max()) < 0.5


def test_invisible_parts_are_ignored():
    # part 2 is missing on 6 of 20 images: the rate is over the 14 where it is visible, so still 100 %
    maps, kp = _two_prototype_case(part2_invisible=range(6))
    # the invisible part's stale keypoint sits under the peak: it must not count as covered
    cov = part_coverage(maps, kp, image_size=224)
    assert not cov[:6, :, 2].any()
    assert not cov[:, :, 3].any()  # never visible
    res = consistency(cov, kp[..., 2] > 0.5)
    assert res.per_prototype.tolist() == [True, False]
    assert res.visible_count.tolist() == [20, 20, 14, 0]
    assert res.per_prototype_part_rate[:, 3].tolist() == [0.0, 0.0]


def test_consistency_threshold_is_inclusive():
    vis = torch.ones(5, 1, dtype=torch.bool)
    four = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool).view(5, 1, 1)
    three = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool).view(5, 1, 1)
    assert consistency(four, vis).per_prototype.tolist() == [True]  # 4/5 = 0.8 >= 0.8
    assert consistency(three, vis).per_prototype.tolist() == [False]
    assert consistency(three, vis, threshold=0.6).per_prototype.tolist() == [True]


def test_consistency_input_errors():
    with pytest.raises(InputValueError, match="not visible"):
        consistency(torch.ones(2, 1, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="visible"):
        consistency(torch.ones(2, 1, 3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(InputValueError, match="threshold"):
        consistency(torch.ones(2, 1, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool), threshold=80)
    with pytest.raises(InputValueError, match="N=0"):
        consistency(torch.ones(0, 1, 3, dtype=torch.bool), torch.ones(0, 3, dtype=torch.bool))


def test_stability_counts_unchanged_part_vectors():
    maps, kp = _two_prototype_case()
    cov = part_coverage(maps, kp, image_size=224)
    same = stability(cov, cov.clone())
    assert same.score == 100.0 and same.per_prototype.tolist() == [1.0, 1.0]
    noisy = cov.clone()
    noisy[0, 1, 0] = ~noisy[0, 1, 0]
    noisy[3, 1] = ~noisy[3, 1]
    res = stability(cov, noisy)
    assert res.per_prototype.tolist() == [1.0, 18 / 20]
    assert res.score == pytest.approx(100 * (1 + 0.9) / 2)
    with pytest.raises(ShapeError, match="same shape"):
        stability(cov, cov[:, :1])


# ============================================================================================ protoeval driver

class _BlobParts(Dataset):
    """Images with a bright square on part 2 (channel 0) and uniform noise (channel 1); 2 classes, 3 parts."""

    classes = ["a", "b"]
    part_names = ["p0", "p1", "p2"]
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, n_per_class=12, size=64, with_keypoints=True):
        self.size, self.with_keypoints = size, with_keypoints
        self.labels = [i // n_per_class for i in range(2 * n_per_class)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        S = self.size
        g = torch.Generator().manual_seed(1000 + i)
        kp = torch.zeros(3, 3)
        kp[:, :2] = 12 + torch.rand(3, 2, generator=g) * (S - 24)
        kp[:, 2] = 1
        if i % 4 == 3:
            kp[2, 2] = 0  # part 2 missing: no square drawn
        img = torch.zeros(3, S, S)
        img[1] = torch.rand(S, S, generator=g)
        if kp[2, 2]:
            x, y = int(kp[2, 0]), int(kp[2, 1])
            img[0, y - 3 : y + 4, x - 3 : x + 4] = 4.0
        item = {"image": img, "label": self.labels[i], "image_id": str(i)}
        if self.with_keypoints:
            item["keypoints"] = kp
        return item


def _blob_head(sign=1.0):
    # class 0: prototype 0 reads the square channel, prototype 1 the noise channel; class 1: the same, swapped
    protos = torch.tensor([[[sign, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0], [sign, 0.0, 0.0]]])
    signs = torch.tensor([[sign, 1.0], [1.0, sign]])
    return PartPrototypeHead(protos, torch.tensor([0.5, -0.5]), signs=signs)


_POOL4 = nn.AvgPool2d(4).eval()


def test_protoeval_known_answers():
    ds = _BlobParts()
    res = protoeval(_POOL4, _blob_head(), ds, noise_std=0.0, batch_size=5)
    assert res.classes == [0, 1]
    assert res.consistent.tolist() == [[True, False], [False, True]]
    assert res.consistency == 50.0
    assert res.stability == 100.0  # zero noise: nothing changes
    assert res.part_rate.shape == (2, 2, 3) and res.stable_fraction.shape == (2, 2)
    r0 = res.per_class[0]
    assert r0.covered.shape == (12, 2, 3) and r0.visible.shape == (12, 3) and r0.peaks.shape == (12, 2, 2)
    assert r0.image_indices == list(range(12))
    assert float(r0.consistency.per_prototype_part_rate[0, 2]) == 1.0
    assert res.settings["box_half_size_px"] == [[10, 10]]  # 36 * 64 / 224 = 10.3
    json.dumps(res.to_dict())

    noisy = protoeval(_POOL4, _blob_head(), ds, noise_std=0.2, seed=3)
    again = protoeval(_POOL4, _blob_head(), ds, noise_std=0.2, seed=3, batch_size=7, classes=[1, 0])
    assert noisy.stability < 100.0
    # the square is found under noise, the noise peaks move
    assert float(noisy.stable_fraction[0, 0]) == 1.0 and float(noisy.stable_fraction[0, 1]) < 0.8
    # the noise is seeded per image: batching and class order change nothing
    assert torch.equal(again.per_class[1].covered_noisy, noisy.per_class[0].covered_noisy)


def test_protoeval_locates_negative_evidence_through_the_signs():
    ds = _BlobParts()
    oriented = protoeval(_POOL4, _blob_head(sign=-1.0), ds, noise_std=0.0)
    raw = protoeval(_POOL4, _blob_head(sign=-1.0), ds, noise_std=0.0, use_oriented=False)
    assert oriented.consistent.tolist() == [[True, False], [False, True]]
    assert not bool(raw.consistent[0, 0]) and not bool(raw.consistent[1, 1])
    # an override is evaluated with signs +1: the positive prototypes recover consistency
    over = protoeval(_POOL4, _blob_head(sign=-1.0), ds, noise_std=0.0, prototypes_override=_blob_head().prototypes)
    assert over.consistent.tolist() == [[True, False], [False, True]]
    assert over.settings["prototypes"] == "override"


def test_protoeval_input_errors():
    head = _blob_head()
    with pytest.raises(InputValueError, match="keypoints"):
        protoeval(_POOL4, head, _BlobParts(with_keypoints=False))
    with pytest.raises(InputValueError, match="no images"):
        protoeval(_POOL4, PartPrototypeHead(torch.ones(3, 2, 3)), _BlobParts())
    with pytest.raises(InputValueError, match="training mode"):
        protoeval(nn.Sequential(nn.AvgPool2d(4)).train(), head, _BlobParts())
    with pytest.raises(ShapeError, match="prototypes_override"):
        protoeval(_POOL4, head, _BlobParts(), prototypes_override=torch.ones(2, 2, 5))
    with pytest.raises(InputValueError, match="noise_std"):
        protoeval(_POOL4, head, _BlobParts(), noise_std=-0.1)


# ============================================================================================ faithfulness axioms

def _random_head(g, C, k, D, dtype=torch.float64):
    return PartPrototypeHead(torch.randn(C, k, D, generator=g, dtype=dtype),
                             torch.randn(C, generator=g, dtype=dtype),
                             signs=torch.sign(torch.randn(C, k, generator=g, dtype=dtype)))


dims = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 6), st.integers(1, 3), st.integers(1, 4),
                 st.integers(1, 4), st.integers(0, 2**31 - 1))


@FAST
@given(dims=dims, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_axioms_hold_on_random_heads(dims, a, b):
    C, k, D, B, H, W, seed = dims
    g = torch.Generator().manual_seed(seed)
    head, other = _random_head(g, C, k, D), _random_head(g, C, k, D)
    fmap = torch.rand(B, D, H, W, generator=g, dtype=torch.float64) * 3
    assert completeness_error(head.explain(fmap)) <= 1e-5
    assert completeness_error(head.explain(fmap), logits=head(fmap)) <= 1e-5
    assert sensitivity_check(head, fmap) <= 1e-5
    assert linearity_check(head, other, fmap, a, b) <= 1e-5
    # symmetry: copy channel 0 onto channel D-1 in the features and the prototypes
    fmap_s = fmap.clone()
    fmap_s[:, -1] = fmap_s[:, 0]
    protos = head.prototypes.clone()
    protos[..., -1] = protos[..., 0]
    sym = PartPrototypeHead(protos, head.bias, signs=head.signs)
    assert symmetry_check(sym, fmap_s, 0, D - 1) <= 1e-5
    attr = channel_attributions(head, fmap)
    assert attr.shape == (B, C, k, D)
    assert torch.allclose(attr.sum(-1), head.explain(fmap).contributions, atol=1e-9)


def test_axioms_hold_in_float32():
    g = torch.Generator().manual_seed(0)
    head, other = _random_head(g, 4, 3, 8, torch.float32), _random_head(g, 4, 3, 8, torch.float32)
    fmap = torch.rand(3, 8, 7, 7, generator=g)  # values of order 1: float32 rounding stays well below 1e-5
    assert completeness_error(head.explain(fmap)) <= 1e-5
    assert sensitivity_check(head, fmap) <= 1e-5
    assert linearity_check(head, other, fmap, 0.7, -1.3) <= 1e-5


def test_zero_prototype_has_zero_contribution_and_removing_it_changes_nothing():
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    protos[0, 1] = 0
    head = PartPrototypeHead(protos, torch.zeros(2, dtype=torch.float64))
    fmap = torch.rand(4, 5, 3, 3, generator=g, dtype=torch.float64)
    assert head.explain(fmap).contributions[:, 0, 1].abs().max() == 0
    assert sensitivity_check(head, fmap) <= 1e-12


class _ForgotBiasHead(PartPrototypeHead):
    """Broken: reports bias 0 although its logits include the bias."""

    def explain(self, fmap, *, classes=None):
        ex = super().explain(fmap, classes=classes)
        return dataclasses.replace(ex, bias=torch.zeros_like(ex.bias))


class _UniformCreditHead(PartPrototypeHead):
    """Broken: splits each logit (minus bias) evenly over the k prototypes; complete, but not sensitive."""

    def explain(self, fmap, *, classes=None):
        ex = super().explain(fmap, classes=classes)
        share = ((ex.logits - ex.bias) / self.k).unsqueeze(-1).expand_as(ex.contributions)
        heat = share[..., None, None].expand_as(ex.heatmaps)
        return dataclasses.replace(ex, contributions=share.contiguous(), heatmaps=heat.contiguous())


class _SquaredHead(PartPrototypeHead):
    """Broken: squared (nonlinear) heatmaps, contributions their means."""

    def explain(self, fmap, *, classes=None):
        ex = super().explain(fmap, classes=classes)
        heat = ex.heatmaps**2
        contrib = heat.mean((-2, -1))
        return Explanation(contrib.sum(-1) + ex.bias, contrib, heat, ex.bias, ex.signs, ex.classes)


def _broken_setup():
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    protos[1, 2] = 0  # a zero prototype: uniform credit gives it a share anyway
    bias = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    fmap = torch.rand(2, 6, 3, 3, generator=g, dtype=torch.float64)
    return protos, bias, fmap


def test_completeness_fails_for_a_wrong_bias():
    protos, bias, fmap = _broken_setup()
    broken = _ForgotBiasHead(protos, bias)
    assert completeness_error(broken.explain(fmap)) == pytest.approx(2.0)
    # an explanation whose logits disagree with the model's fails against the model's logits
    ex = PartPrototypeHead(protos, bias).explain(fmap)
    lying = dataclasses.replace(ex, contributions=ex.contributions * 1.5, logits=ex.contributions.sum(-1) * 1.5 + bias)
    assert completeness_error(lying, include_heatmaps=False) <= 1e-12
    assert completeness_error(lying, logits=ex.logits) > 0.01
    assert completeness_error(lying) > 0.01  # the heatmaps no longer add up to the contributions


def test_sensitivity_fails_for_uniform_credit():
    protos, bias, fmap = _broken_setup()
    broken = _UniformCreditHead(protos, bias)
    assert completeness_error(broken.explain(fmap)) <= 1e-12  # complete ...
    assert sensitivity_check(broken, fmap) > 0.01  # ... but not sensitive


def test_linearity_fails_for_squared_heatmaps():
    protos, bias, fmap = _broken_setup()
    a, b = _SquaredHead(protos, bias), _SquaredHead(protos.flip(0), bias)
    assert completeness_error(a.explain(fmap)) <= 1e-12
    assert linearity_check(a, b, fmap, 2.0, -0.5) > 0.01
    with pytest.raises(TypeError, match="one type"):
        linearity_check(a, PartPrototypeHead(protos, bias), fmap, 1.0, 1.0)


def test_symmetry_fails_for_a_channel_asymmetric_attribution():
    protos, bias, fmap = _broken_setup()
    fmap[:, 4] = fmap[:, 1]
    protos[..., 4] = protos[..., 1]
    head = PartPrototypeHead(protos, bias)
    assert symmetry_check(head, fmap, 1, 4) <= 1e-12

    def by_index(h, f):  # weighs channel d by d + 1
        return channel_attributions(h, f) * torch.arange(1, f.shape[1] + 1, dtype=f.dtype)

    assert symmetry_check(head, fmap, 1, 4, attribution=by_index) > 0.01
    with pytest.raises(InputValueError, match="channels 0 and 4"):
        symmetry_check(head, fmap, 0, 4)


# ============================================================================================ parity

def test_accuracy_parity_and_reconstruction_error():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(2, 3, generator=g)
    protos = torch.randn(2, 4, 3, generator=g)
    protos[:, -1] = weight - protos[:, :-1].sum(1)  # sum_i p_i = v exactly up to rounding
    bias = torch.tensor([0.1, -0.1])
    head = PartPrototypeHead(protos, bias)
    assert head_reconstruction_error(head, weight) <= 1e-6
    ds = _BlobParts(n_per_class=4)
    res = accuracy_parity(_POOL4, weight, bias, head, ds, batch_size=3)
    assert res["n_images"] == 8 and res["prediction_agreement"] == 1.0
    assert res["accuracy_original"] == res["accuracy_decomposed"] and res["max_abs_logit_diff"] <= 1e-5
    # precomputed feature maps give the same numbers
    fm = torch.stack([_POOL4(ds[i]["image"][None])[0] for i in range(len(ds))])
    pre = accuracy_parity(None, weight, bias, head, (fm, torch.tensor(ds.labels)), batch_size=5)
    assert pre["accuracy_original"] == res["accuracy_original"] and pre["n_images"] == 8
    # a head that does not sum to the weight shows up
    bad = PartPrototypeHead(protos * 1.1, bias)
    assert head_reconstruction_error(bad, weight) > 0.01
    assert accuracy_parity(None, weight, bias, bad, (fm, torch.tensor(ds.labels)))["max_abs_logit_diff"] > 1e-3
    with pytest.raises(ShapeError, match=r"weight must have shape \[C=2, D=3\]"):
        accuracy_parity(None, weight.T, bias, head, (fm, torch.tensor(ds.labels)))
    with pytest.raises(InputValueError, match="mean"):
        accuracy_parity(_POOL4, weight, bias, head, [(torch.zeros(2, 3, 64, 64), torch.zeros(2))])


# ============================================================================================ pipeline + baselines

@pytest.fixture(scope="module")
def synth():
    """An untrained SynthPartsCNN (width 32, 64 px) on 3 classes and a planted head of its NMF prototypes (k = 3).

    Planted (instead of decompose_head, whose refinement is tested in test_decompose.py): ``p~_i = P_i + R / k``
    with P the NMF prototypes of each class's training features and ``R = v - sum_i P_i``, so ``sum_i p~_i = v``.
    """
    from phpn_core import nmf
    from phpn_core.data.base import normalize
    from phpn_core.data.synthparts import SynthParts
    from phpn_core.method.decompose import HeadDecomposition
    from phpn_core.models.synthparts_cnn import SynthPartsCNN

    train = SynthParts(split="train", n_classes=3, n_per_class=10, image_size=64)
    test = SynthParts(split="test", n_classes=3, n_per_class=5, image_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SynthPartsCNN(3, width=32).eval()
    features = model.features  # GAP + linear: logits = classifier(features(x).mean((2, 3)))
    weight, bias = model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    fb = {}
    with torch.no_grad():
        for c in range(3):
            idx = [i for i, lab in enumerate(train.labels) if lab == c]
            x = normalize(torch.stack([train[i]["image"] for i in idx]), train.mean, train.std)
            fb[c] = features(x).permute(0, 2, 3, 1).contiguous()
    P = nmf(torch.stack([fb[c].reshape(-1, 32) for c in range(3)]), 3, seed=0).P  # [3, k, D]
    residual = ((weight - P.sum(1)) / 3).unsqueeze(1).expand(-1, 3, -1)
    protos = P + residual
    hd = HeadDecomposition(prototypes=protos, initial=P, alpha=torch.ones(3, 3), residual=residual.clone(),
                           rel_error=torch.zeros(3), head_error=(protos.sum(1) - weight).abs().amax(1),
                           classes=[0, 1, 2])
    head = PartPrototypeHead.from_decomposition(hd, bias)
    return {"train": train, "test": test, "model": model, "features": features, "weight": weight, "bias": bias,
            "hd": hd, "head": head, "fb": fb}


def test_protoeval_end_to_end_on_synthparts(synth):
    from phpn_core.evaluation.baselines import plain_nmf_prototypes

    f, head, test = synth["features"], synth["head"], synth["test"]
    res = protoeval(f, head, test, batch_size=4)
    P = len(test.part_names)
    assert res.classes == [0, 1, 2]
    assert res.consistent.shape == (3, 3) and res.part_rate.shape == (3, 3, P) and res.stable_fraction.shape == (3, 3)
    assert 0.0 <= res.consistency <= 100.0 and 0.0 <= res.stability <= 100.0
    assert res.consistency == pytest.approx(100 * res.consistent.double().mean().item())
    for r in res.per_class:
        assert r.covered.shape == (5, 3, P) and r.covered_noisy.shape == (5, 3, P)
        assert not (r.covered & ~r.visible[:, None]).any()
    assert protoeval(f, head, test, noise_std=0.0).stability == 100.0
    nmf = protoeval(f, head, test, prototypes_override=plain_nmf_prototypes(synth["hd"]), classes=[2])
    assert nmf.classes == [2] and nmf.consistent.shape == (1, 3)
    parity = accuracy_parity(f, synth["weight"], synth["bias"], head, test)
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["prediction_agreement"] == 1.0
    assert head_reconstruction_error(head, synth["weight"]) <= 1e-4


def test_dff_concepts_shapes_nonnegative_and_match_grad_cam(synth):
    from phpn_core.evaluation.baselines import dff_concepts

    pytest.importorskip("sklearn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at grad-cam's max_iter
        concepts = dff_concepts(synth["features"], synth["train"], k=4)
        partial = dff_concepts(synth["features"], synth["train"], k=2, classes=[1], init="nndsvda")
        from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff

        acts = synth["fb"][0].permute(0, 3, 1, 2).contiguous().numpy()
        ref_concepts, _ = dff(acts.copy(), n_components=4)  # grad-cam: [D, k]
    assert concepts.shape == (3, 4, 32) and concepts.dtype == torch.float32
    assert bool((concepts >= 0).all())
    # phpn evaluates the factorised directions: grad-cam's concepts minus each channel's minimum
    offset = torch.from_numpy(acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1).min(-1)).float()
    assert torch.allclose(concepts[0] + offset, torch.from_numpy(ref_concepts.T).float(), rtol=1e-4, atol=1e-5)
    assert partial.shape == (3, 2, 32) and partial[0].abs().sum() == 0 and partial[1].abs().sum() > 0
    res = protoeval(synth["features"], synth["head"], synth["test"], prototypes_override=concepts)
    assert res.consistent.shape == (3, 4)


def test_gradcam_shapes_closed_form_and_grad_cam(synth):
    from phpn_core.evaluation.baselines import gradcam_heatmaps, gradcam_keypoint_hit
    from phpn_core.data.base import normalize

    test, f, W, b = synth["test"], synth["features"], synth["weight"], synth["bias"]
    x = normalize(torch.stack([test[i]["image"] for i in range(6)]), test.mean, test.std)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    cams = gradcam_heatmaps(f, W, b, x, targets, batch_size=4)
    assert cams.shape == (6, 4, 4) and bool((cams >= 0).all())
    with torch.no_grad():
        fm = f(x)
    closed = torch.relu(torch.einsum("bdhw,bd->bhw", fm, W[targets])) / 16
    assert torch.allclose(cams, closed, atol=1e-6)

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = synth["model"]
    cam = GradCAM(model=model, target_layers=[model.features[-1]])
    try:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))
    finally:
        cam.activations_and_grads.release()

    def minmax(t):  # grad-cam's scale_cam_image, applied after each layer's resize and again after the mean
        t = t - t.amin((1, 2), keepdim=True)
        return t / (1e-7 + t.amax((1, 2), keepdim=True))

    up = torch.nn.functional.interpolate(minmax(cams)[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    ours = minmax(up[:, 0])
    assert ref.shape == (6, 64, 64)
    assert torch.allclose(ours, ref, atol=2e-3)

    hit = gradcam_keypoint_hit(f, W, b, test, batch_size=4)
    P = len(test.part_names)
    assert hit.n_images == 15 and hit.covered.shape == (15, P) and hit.per_part_hit_rate.shape == (P,)
    assert 0.0 <= hit.hit_rate <= 1.0
    assert hit.hit_rate == pytest.approx(hit.covered.any(-1).double().mean().item())


def test_protoeval_skips_unused_slots():
    ds = _BlobParts()
    base = _blob_head()
    ref = protoeval(_POOL4, base, ds, noise_std=0.2, seed=3)
    # a third slot, zero for class 0 (an unused slot) and a copy of prototype 0 for class 1
    protos = torch.cat([base.prototypes, torch.zeros(2, 1, 3)], 1)
    protos[1, 2] = protos[1, 0] / 2
    head = PartPrototypeHead(protos, base.bias, signs=torch.cat([base.signs, torch.ones(2, 1)], 1))
    res = protoeval(_POOL4, head, ds, noise_std=0.2, seed=3)
    c0, r0 = res.per_class[0], ref.per_class[0]
    assert c0.consistency.score == pytest.approx(r0.consistency.score)
    assert c0.stability.score == pytest.approx(r0.stability.score)
    # the mean runs over the 5 prototypes in use, not the 6 slots
    used = torch.cat([ref.consistent.double().flatten(), res.consistent[1, 2:].double()])
    assert res.consistency == pytest.approx(float(used.mean() * 100))
    with pytest.raises(ShapeError, match="active must be a bool tensor"):
        from phpn_core.evaluation.protoeval import protoeval_maps

        protoeval_maps(lambda x, c: _POOL4(x)[:, :2], ds, n_classes=2, active=torch.ones(3, 2, dtype=torch.bool))

