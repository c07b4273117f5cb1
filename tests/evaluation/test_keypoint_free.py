"""Keypoint-free metrics: deletion/insertion AUC, box stability, redundancy.

Each metric first fails on a constructed bad case (a map on the background, a map that jumps under noise, two
identical prototypes), on a tiny model whose evidence location is known; then properties and input errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.evaluation import (
    box_stability,
    deletion_insertion,
    keypoint_free,
    keypoint_free_gradcam,
    keypoint_free_maps,
    map_redundancy,
)
from phpn_core.method.head import PartPrototypeHead

S = 32


class _Squares(Dataset):
    """Class 0: a red square (the evidence) at a known place on a blue background; class 1: a green square.
    Images in [0, 1]; ``flat=True`` gives plain grey images (nothing to locate)."""

    part_names = None
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    classes = ["red", "green"]

    def __init__(self, n=4, flat=False):
        self.items = []
        g = torch.Generator().manual_seed(1)
        for c in (0, 1):
            for i in range(n):
                img = torch.full((3, S, S), 0.5) if flat else torch.zeros(3, S, S)
                if not flat:
                    img[2] = 0.6  # blue background
                    r, q = (int(v) for v in torch.randint(2, S - 10, (2,), generator=g))
                    img[:, r:r + 8, q:q + 8] = 0.0
                    img[c, r:r + 8, q:q + 8] = 1.0
                self.items.append({"image": img, "label": c, "image_id": f"{c}-{i}"})
        self.labels = [it["label"] for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Features(nn.Module):
    """Feature maps [B, 3, 8, 8]: the image's colour channels, thresholded (relu(x - 0.3)), 4x4 average pooled.

    The threshold makes the evidence local: a blurred or removed square loses its red."""

    def forward(self, x):
        return nn.functional.avg_pool2d(torch.relu(x - 0.3), 4)


def _head(protos=None):
    # class 0 = red, class 1 = green; k = 2: the colour and half of it again (two prototypes on the same part)
    if protos is None:
        protos = torch.tensor([[[1.0, 0, 0], [0, 0, 0.5]], [[0, 1.0, 0], [0, 0, 0.5]]])
    return PartPrototypeHead(protos, torch.zeros(2))


# ============================================================================================ bad cases first

@pytest.mark.parametrize("baseline", ["blur", "mean", "zero"])
def test_a_map_on_the_background_scores_worse_than_a_map_on_the_evidence(baseline):
    ds, f = _Squares(), _Features().eval()
    x = torch.stack([ds[i]["image"] for i in range(4)])  # class 0: red squares
    good = f(x)[:, :1]  # [N, 1, 8, 8]: high on the red square
    bad = f(x)[:, 2:3]  # high on the blue background
    w = torch.tensor([1.0, 0.0, 0.0])

    def score(xb):  # the class-0 logit
        return (f(xb).mean((2, 3)) @ w)[:, None]

    ok = deletion_insertion(score, x, good, steps=16, baseline=baseline)
    wrong = deletion_insertion(score, x, bad, steps=16, baseline=baseline)
    assert bool(ok.valid.all()) and bool(wrong.valid.all())
    assert float(ok.insertion_auc.mean()) > float(wrong.insertion_auc.mean()) + 0.3
    assert float(ok.deletion_auc.mean()) < float(wrong.deletion_auc.mean()) - 0.3


def test_prototypes_pointing_at_background_lose_on_the_class_logit():
    ds, f = _Squares(), _Features().eval()
    head = _head()
    ours = keypoint_free(f, head, ds, steps=8)
    # the same model, prototypes on the background only: their summed map misses the class's evidence
    back = torch.tensor([[[0, 0, 1.0], [0, 0, 0.5]], [[0, 0, 1.0], [0, 0, 0.5]]])
    other = keypoint_free(f, head, ds, prototypes_override=back, steps=8)
    assert ours.insertion_auc_class > other.insertion_auc_class + 0.2
    assert ours.deletion_auc_class < other.deletion_auc_class - 0.2
    cam = keypoint_free_gradcam(f, head.weight, head.bias, ds, steps=8)
    assert cam.insertion_auc == cam.insertion_auc_class and cam.redundancy is None and cam.duplicate_rate is None
    assert cam.insertion_auc > other.insertion_auc_class


def test_two_identical_prototypes_are_a_duplicate():
    ds, f = _Squares(), _Features().eval()
    twins = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]], [[0, 1.0, 0], [0, 1.0, 0]]])
    res = keypoint_free(f, PartPrototypeHead(twins, torch.zeros(2)), ds, steps=4)
    assert res.redundancy == pytest.approx(1.0) and res.duplicate_rate == 1.0
    assert all(r["duplicate"] for r in res.per_class)
    distinct = keypoint_free(f, _head(), ds, steps=4)  # colour vs background: anti-correlated maps
    assert distinct.redundancy < 0.5 and distinct.duplicate_rate == 0.0
    cos = map_redundancy(torch.randn(3, 2, 5, 5).repeat(1, 1, 1, 1)[:, [0, 0]])
    assert torch.allclose(cos, torch.ones(2, 2, dtype=torch.float64))


def test_a_map_that_jumps_under_noise_is_not_box_stable():
    f = _Features().eval()
    peaked, flat = _Squares(), _Squares(flat=True)

    def maps_fn(x, c):  # the raw red channel at full resolution: on a flat image its argmax follows the noise
        return x[:, :1]

    def score_fn(x, c):
        return f(x).mean((2, 3))[:, :1]

    common = dict(n_classes=2, summed=False, steps=4, noise_std=0.2, noise_clip=0.25)
    on_square = keypoint_free_maps(lambda x, c: f(x)[:, c:c + 1], score_fn, peaked, **common)
    jumpy = keypoint_free_maps(maps_fn, score_fn, flat, **common)
    assert on_square.box_stability == 1.0
    assert jumpy.box_stability < 0.5
    assert keypoint_free_maps(maps_fn, score_fn, flat, **{**common, "noise_std": 0.0}).box_stability == 1.0


def test_box_stability_iou_on_known_boxes():
    a = torch.zeros(1, 2, 224, 224)
    b = torch.zeros(1, 2, 224, 224)
    a[0, 0, 100, 100] = b[0, 0, 100, 136] = 1  # boxes of 73 px shifted by 36: IoU = 36 / 108 = 1/3
    a[0, 1, 100, 100] = b[0, 1, 100, 110] = 1  # shifted by 10: IoU = 62 / 82
    stable, iou = box_stability(a, b, image_size=224)
    assert iou[0, 0] == pytest.approx(36 / 108) and iou[0, 1] == pytest.approx(62 / 82)
    assert stable.tolist() == [[False, True]]


# ============================================================================================ properties

def test_shapes_range_determinism_and_inputs_unmutated():
    ds, f = _Squares(n=3), _Features().eval()
    head = _head()
    before = [ds[i]["image"].clone() for i in range(len(ds))]
    protos = head.prototypes.clone()
    a = keypoint_free(f, head, ds, steps=6, seed=3)
    b = keypoint_free(f, head, ds, steps=6, seed=3)
    assert a.to_dict() == b.to_dict()
    assert all(torch.equal(ds[i]["image"], before[i]) for i in range(len(ds)))
    assert torch.equal(head.prototypes, protos)
    for v in (a.insertion_auc, a.deletion_auc, a.insertion_auc_class, a.deletion_auc_class, a.box_stability,
              a.duplicate_rate):
        assert 0.0 <= v <= 1.0
    assert -1.0 <= a.redundancy <= 1.0
    assert a.classes == [0, 1] and len(a.per_class) == 2
    row = a.per_class[0]
    assert len(row["insertion_auc_per_prototype"]) == 2 and len(row["cosine"]) == 2
    x = torch.stack([ds[i]["image"] for i in range(3)])
    sal = torch.rand(3, 4, 8, 8)
    x0, s0 = x.clone(), sal.clone()
    res = deletion_insertion(lambda xb: f(xb).mean((2, 3)).repeat(1, 2)[:, :4] + 1.0, x, sal, steps=5)
    assert torch.equal(x, x0) and torch.equal(sal, s0)
    assert res.deletion.shape == (3, 4, 6) and res.insertion_auc.shape == (3, 4) and res.valid.shape == (3, 4)
    ok = res.valid
    assert bool((res.deletion[ok] >= 0).all() and (res.deletion[ok] <= 1).all())
    assert torch.equal(res.deletion[..., 0][ok], torch.ones_like(res.deletion[..., 0][ok]))
    assert torch.equal(res.insertion[..., -1][ok], torch.ones_like(res.insertion[..., -1][ok]))


def test_a_score_the_perturbation_does_not_change_has_no_curve():
    x = torch.rand(2, 3, 16, 16)
    res = deletion_insertion(lambda xb: torch.ones(xb.shape[0], 1), x, torch.rand(2, 1, 4, 4), steps=4)
    assert not bool(res.valid.any()) and bool(torch.isnan(res.insertion_auc).all())


def test_normalisation_ignores_the_score_sign_and_scale():
    ds, f = _Squares(n=2), _Features().eval()
    x = torch.stack([ds[i]["image"] for i in range(2)])
    sal = f(x)[:, :1]
    base = deletion_insertion(lambda xb: f(xb).mean((2, 3))[:, :1], x, sal, steps=8)
    neg = deletion_insertion(lambda xb: -7.0 * f(xb).mean((2, 3))[:, :1] + 3.0, x, sal, steps=8)
    assert torch.allclose(base.insertion_auc, neg.insertion_auc, atol=1e-6)
    assert torch.allclose(base.deletion_auc, neg.deletion_auc, atol=1e-6)


# ============================================================================================ errors

def test_clear_errors_on_bad_inputs():
    ds, f = _Squares(n=2), _Features().eval()
    x, sal = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 4, 4)
    score = lambda xb: torch.rand(xb.shape[0], 1)
    with pytest.raises(ShapeError, match=r"\[N, 3, H, W\]"):
        deletion_insertion(score, x[0], sal)
    with pytest.raises(ShapeError, match=r"\[N=2, M>=1"):
        deletion_insertion(score, x, sal[:1])
    with pytest.raises(ShapeError, match=r"score_fn must return \[B=\d+, M=1\]"):
        deletion_insertion(lambda xb: torch.rand(xb.shape[0], 3), x, sal)
    with pytest.raises(InputValueError, match="steps must be >= 2"):
        deletion_insertion(score, x, sal, steps=1)
    with pytest.raises(InputValueError, match="baseline must be one of"):
        deletion_insertion(score, x, sal, baseline="black")
    with pytest.raises(InputValueError, match="NaN"):
        deletion_insertion(score, x, torch.full_like(sal, math.nan))
    with pytest.raises(ShapeError, match="same shape"):
        box_stability(sal, sal[:1], image_size=16)
    with pytest.raises(InputValueError, match="iou_threshold"):
        box_stability(sal, sal, image_size=16, iou_threshold=0)
    with pytest.raises(InputValueError, match="no images"):
        map_redundancy(torch.zeros(0, 2, 4, 4))
    with pytest.raises(ShapeError, match=r"prototypes_override must have shape \[C=2, k', D=3\]"):
        keypoint_free(f, _head(), ds, prototypes_override=torch.zeros(2, 2, 4))
    with pytest.raises(InputValueError, match="max_images"):
        keypoint_free(f, _head(), ds, max_images=0)
    with pytest.raises(InputValueError, match="training mode"):
        keypoint_free(_Features().train(), _head(), ds)
    with pytest.raises(TypeError, match="PartPrototypeHead"):
        keypoint_free(f, object(), ds)
    with pytest.raises(InputValueError, match="classes"):
        keypoint_free(f, _head(), ds, classes=[5])


# ============================================================================================ in evaluate_all

def test_evaluate_all_reports_the_keypoint_free_metrics_for_every_method():
    import warnings

    from phpn_core.evaluation.suite import evaluate_all

    pytest.importorskip("sklearn")
    ds, f = _Squares(n=3), _Features().eval()
    head = _head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate_all(f, head, ds, initial=head.prototypes.abs(), train_dataset=ds, keypoint_free_images=2,
                           keypoint_free_steps=4)
    s = out["summary"]
    assert s["consistency"] is None and s["stability"] is None  # no keypoints: ProtoEval is not defined
    keys = ("insertion_auc", "deletion_auc", "box_stability", "redundancy", "duplicate_rate")
    for name, vals in [("phpn", s)] + [(n, s["baselines"][n]) for n in ("plain_nmf", "dff")]:
        for key in keys:
            assert isinstance(vals[key], float), (name, key)
    gc = s["baselines"]["gradcam"]
    assert {"insertion_auc", "deletion_auc", "box_stability"} <= set(gc) and "redundancy" not in gc
    assert out["details"]["phpn"]["keypoint_free"]["settings"]["max_images"] == 2
    assert len(out["details"]["dff"]["keypoint_free"]["per_class"]) == 2
    off = evaluate_all(f, head, ds, baselines=False, keypoint_free_metrics=False)["summary"]
    assert "insertion_auc" not in off and "baselines" not in off


def test_unused_slots_count_nowhere():
    # A class decomposed with fewer prototypes has zero prototypes in its unused slots: the metrics of a head
    # with such a slot equal those of the same prototypes without it, and a zero slot is never a duplicate.
    ds, f = _Squares(), _Features().eval()
    base = _head()
    padded = torch.cat([base.prototypes, torch.zeros(2, 1, 3)], 1)
    padded[1, 2] = padded[1, 1]  # class 1 keeps three real prototypes, two of them twins
    padded[1, 1] = torch.tensor([0.0, 0.0, 0.25])
    head3 = PartPrototypeHead(padded, torch.zeros(2))
    assert head3.active.tolist() == [[True, True, False], [True, True, True]]
    assert head3.k_per_class.tolist() == [2, 3]
    res = keypoint_free(f, head3, ds, steps=4)
    ref = keypoint_free(f, base, ds, steps=4, classes=[0])
    row0 = res.per_class[0]
    assert row0["k"] == 2 and ref.per_class[0]["k"] == 2
    for key in ("insertion_auc", "deletion_auc", "box_stability", "redundancy"):
        assert row0[key] == pytest.approx(ref.per_class[0][key])
    assert res.per_class[1]["duplicate"] and not row0["duplicate"]
    # the zero slot's constant map would have cosine 0 with the others: it is not even a candidate pair
    bad_mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ShapeError, match="active has k=2 columns"):
        keypoint_free_maps(lambda x, c: f(x)[:, :3], lambda x, c: f(x).mean((2, 3)), ds, n_classes=2, summed=False,
                           active=bad_mask, steps=4)
