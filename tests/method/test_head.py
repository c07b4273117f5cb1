"""PartPrototypeHead: logits equal the original head's, completeness, persistence without pickle."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phpn_core import PartPrototypeHead, decompose_head
from phpn_core.data.planted import planted_features


@settings(max_examples=20, deadline=None)
@given(C=st.integers(1, 5), k=st.integers(1, 4), D=st.integers(1, 16), B=st.integers(1, 3),
       H=st.integers(1, 4), seed=st.integers(0, 1000))
def test_logits_equal_linear_head_and_completeness(C, k, D, B, H, seed):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(C, k, D, generator=g)
    bias = torch.randn(C, generator=g)
    fmap = torch.rand(B, D, H, H + 1, generator=g)
    head = PartPrototypeHead(protos, bias)
    original = fmap.mean((2, 3)) @ protos.sum(1).T + bias
    assert torch.allclose(head(fmap), original, atol=1e-5)
    ex = head.explain(fmap)
    assert ex.contributions.shape == (B, C, k) and ex.heatmaps.shape == (B, C, k, H, H + 1)
    assert torch.allclose(ex.contributions.sum(-1) + bias, ex.logits, atol=1e-5)
    assert torch.allclose(ex.logits, original, atol=1e-5)
    assert torch.allclose(ex.heatmaps.mean((-2, -1)), ex.contributions, atol=1e-5)


def test_decomposed_head_reproduces_original_logits():
    feats, _, _ = planted_features(n_classes=4, n_images=6, hw=4, dim=32, seed=0)
    W, b = torch.randn(4, 32), torch.randn(4)
    head = PartPrototypeHead.from_decomposition(decompose_head(feats, W, 3), b)
    fmap = torch.rand(5, 32, 4, 4)
    assert float((head(fmap) - (fmap.mean((2, 3)) @ W.T + b)).abs().max()) <= 1e-4
    ex = head.explain(fmap, classes=[1, 3])
    assert ex.logits.shape == (5, 2)
    assert torch.allclose(ex.logits, head(fmap)[:, [1, 3]], atol=1e-5)
    assert torch.equal(ex.oriented_heatmaps.sign() * ex.heatmaps.sign(),
                       (ex.signs.view(1, 2, 3, 1, 1) * ex.heatmaps.sign() ** 2).sign() * ex.heatmaps.sign() ** 2)


def test_save_load_roundtrip_and_no_pickle(tmp_path):
    head = PartPrototypeHead(torch.randn(3, 2, 5), torch.randn(3), signs=torch.tensor([[1.0, -1], [1, 1], [-1, 1]]))
    p = tmp_path / "head.safetensors"
    head.save(p, metadata={"model": "x", "k": 2})
    loaded, meta = PartPrototypeHead.load(p)
    assert meta == {"model": "x", "k": 2}
    for n in ("prototypes", "bias", "signs"):
        assert torch.equal(getattr(loaded, n), getattr(head, n))
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(Exception):
        PartPrototypeHead.load(evil)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[C, k, D\]"):
        PartPrototypeHead(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"bias must have shape \[C=3\]"):
        PartPrototypeHead(torch.randn(3, 2, 4), torch.randn(4))
    head = PartPrototypeHead(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="D=5 channels"):
        head(torch.rand(1, 5, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, D, H, W\]"):
        head(torch.rand(1, 4))
    with pytest.raises(TypeError, match="head.to"):
        head(torch.rand(1, 4, 2, 2, dtype=torch.float64))
